"""The entry point's failure reporting, in process (the CLI itself: tests/test_main.py)."""

import gc
import signal
import sys

import pytest

from wsda_jax import cli_errors, errors


def _exit_of(error, capsys):
    def run(argv):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        cli_errors.run_reporting_errors(run, ["main"])
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_bad_input_is_one_line_and_status_1(capsys):
    code, lines = _exit_of(ValueError("--workdir=x cannot\nbe written"), capsys)
    assert code == 1 and lines == ["error: --workdir=x cannot be written"]
    code, lines = _exit_of(KeyError("'loss.nonsense'"), capsys)
    assert code == 1 and lines == ["error: 'loss.nonsense'"]


def test_a_quoted_traceback_keeps_its_last_line():
    error = ValueError("Traceback (most recent call last):\n  File x\nOSError: disk full")
    assert cli_errors.one_line(error) == "OSError: disk full"


def test_interrupted_run_names_the_resume_command(capsys):
    code, lines = _exit_of(errors.Interrupted(signal.SIGTERM, 7), capsys)
    assert code == 128 + signal.SIGTERM
    assert lines[0].startswith("Interrupted by SIGTERM at step 7; its checkpoint is saved.")
    assert "python -m wsda_jax.main" in lines[0]


def test_other_errors_are_not_hidden():
    def run(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        cli_errors.run_reporting_errors(run, ["main"])


def test_an_operating_system_error_is_its_reason_and_path(capsys):
    code, lines = _exit_of(NotADirectoryError(20, "Not a directory", "/data/x"), capsys)
    assert code == 1 and lines == ["error: Not a directory: /data/x"]


def test_where_names_the_user_file_and_line(tmp_path):
    path = tmp_path / "config.py"
    path.write_text("def get_config():\n    raise RuntimeError('no')\n")
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    with pytest.raises(RuntimeError) as error:
        namespace["get_config"]()
    assert cli_errors._where(error.value) == f"{path}:2"


def test_the_sigint_handler_is_restored_after_the_command():
    before = signal.getsignal(signal.SIGINT)
    cli_errors.run_reporting_errors(lambda argv: None, ["main"])
    assert signal.getsignal(signal.SIGINT) is before


def _raise_inside_gc(raise_error):
    """Runs one garbage collection whose callback calls raise_error()."""

    def callback(phase, info):
        del info
        if phase == "start":
            gc.callbacks.remove(callback)
            raise_error()

    gc.callbacks.append(callback)
    gc.collect()


def test_ctrl_c_that_python_discards_stops_the_command_without_a_traceback(monkeypatch, capsys):
    """A Ctrl-C handled inside a gc callback (as JAX's runs): Python discards its
    KeyboardInterrupt and would print it with a traceback; the command prints one line,
    ends with 130, and other discarded errors still reach the hook in place before."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    def run(argv):
        _raise_inside_gc(lambda: signal.raise_signal(signal.SIGINT))
        _raise_inside_gc(lambda: sys.exit("a bug in a gc callback"))

    with pytest.raises(SystemExit) as exit_info:
        cli_errors.run_reporting_errors(run, ["main"])
    assert exit_info.value.code == 128 + signal.SIGINT
    assert [unraisable.exc_type for unraisable in reported] == [SystemExit]
    assert capsys.readouterr().err.strip().splitlines() == [
        "Interrupted (SIGINT) outside the train loop: nothing new to save."
    ]
    assert sys.unraisablehook == reported.append


@pytest.mark.parametrize("quiet", [True, False])
def test_orbax_failed_metadata_write_leaves_no_traceback(tmp_path, quiet):
    """Orbax logs a failed metadata write (a full disk, say) with its traceback from a
    background thread; the CLI's filter drops it, the run's one error line says why."""
    import io
    import logging as std_logging

    from orbax.checkpoint._src.metadata import checkpoint as orbax_metadata

    stream = io.StringIO()
    handler = std_logging.StreamHandler(stream)
    if quiet:
        handler.addFilter(cli_errors.quiet_orbax_logs)
    logger = std_logging.getLogger("absl")
    logger.addHandler(handler)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    store = orbax_metadata.metadata_store(enable_write=True)
    try:
        with pytest.raises(OSError):
            store._write_and_log(blocker / "_CHECKPOINT_METADATA", {"metrics": {}})
    finally:
        logger.removeHandler(handler)
        store.close()
    assert ("Traceback" in stream.getvalue()) is not quiet


def test_an_unraisable_filter_installed_by_the_command_stays_after_it(monkeypatch):
    """Orbax's restore-noise filter (`checkpoint_recovery.quiet_background_writes`) is
    meant to stay on until the process exits: the command keeps it in place."""
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # Restored after.

    def added(unraisable):
        del unraisable

    def run(argv):
        sys.unraisablehook = added

    cli_errors.run_reporting_errors(run, ["main"])
    assert sys.unraisablehook is added
