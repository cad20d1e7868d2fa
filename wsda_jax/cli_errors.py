"""How the entry point reports failures: one line on stderr and an exit status.

Bad input (config file, override key, workdir, dataset not prepared, init_from
mismatch, process flags, a workdir in use) exits with `error: ...` and status 1; a
signal during training exits with 128 + the signal's number after naming the command
that resumes. Nothing here imports JAX.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging

from wsda_jax import errors

BAD_INPUT = (ValueError, OSError, KeyError)


# Orbax's error logs (with tracebacks) of a save that failed in its background thread;
# the run stops with one line naming the cause instead (checkpointing.CheckpointWriteError).
_ORBAX_SAVE_FAILURES = (
    "in background save thread",
    "Save Finalize thread",
    "_SignalingThread.run() raised",
)


def quiet_orbax_logs(record: std_logging.LogRecord) -> bool:
    """A log filter that drops Orbax's many INFO lines per checkpoint, its warning that a
    periodic checkpoint carries no mIoU, and its error logs of a failed write (a known
    background-save message, or any record carrying an operating system's error, such as
    a full disk while it writes a step's metadata); other warnings still show."""
    if "/orbax/" not in record.pathname:
        return True
    message = record.getMessage()
    if any(failure in message for failure in _ORBAX_SAVE_FAILURES):
        return False
    if record.exc_info and isinstance(record.exc_info[1], OSError):
        return False
    return record.levelno >= std_logging.WARNING and "tracked_metric" not in message


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (the last line if it quotes a traceback); an
    operating system's error as its reason and path, without the errno."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        paths = [error.filename] + ([error.filename2] if error.filename2 is not None else [])
        return f"{error.strerror}: " + " -> ".join(str(path) for path in paths)
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    if isinstance(error, KeyError | AttributeError) and text[:1] in "'\"":
        text = text[1:-1]  # str(KeyError) adds quotes.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if "Traceback" in text else " ".join(lines)


def _where(error: BaseException) -> str:
    """'FILE:LINE' where `error` arose in the user's code (a config file, say): the
    innermost frame outside Python's, the installed packages' and this file's; '?' if
    there is none."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}"
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith("<")
        and "-packages" not in frame.filename
        and frame.filename != __file__
    ]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def _config_code_error(error: BaseException) -> str:
    """'cannot load the config: FILE:LINE: Type: message' for an error in a config
    file's code."""
    return f"cannot load the config: {_where(error)}: {type(error).__name__}: {one_line(error)}"


_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def _closest_override(argv: list[str], message: str) -> str:
    """' (did you mean --config.KEY?)' for the first --config.KEY override in `argv` that
    is not a config key, naming the closest key beside it (same parent); '' if none is
    close or `message` (ml_collections') already suggests one."""
    from wsda_jax import config_lib, config_schema  # ml_collections only, no JAX.

    if "did you mean" in message.lower():
        return ""
    known = config_schema.leaves(config_lib.base_config())
    for arg in argv[1:]:
        key = arg.removeprefix("--config.").split("=")[0]
        if not arg.startswith("--config.") or key in known:
            continue
        parent, _, name = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
        closest = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
        if not closest:
            return ""
        return f" (did you mean --config.{'.'.join(filter(None, (parent, closest[0])))}?)"
    return ""


# How ml_collections' config_flags quotes the ValueError or TypeError of a config file.
_QUOTED_CONFIG_ERROR = ": Error whilst parsing config file"


def _config_file_error(error: flags.Error) -> str | None:
    """'cannot load the config --config=FILE:ARG: message' for a ValueError or TypeError
    that the config file raised, which config_flags quotes with its traceback (a
    ValueError's message speaks for itself, a TypeError keeps its name); None for other
    flag errors."""
    text = str(error)
    if _QUOTED_CONFIG_ERROR not in text:
        return None
    flag = text.split(_QUOTED_CONFIG_ERROR, 1)[0].removeprefix("flag ")
    kind, _, message = one_line(error).partition(": ")
    return f"cannot load the config {flag}: " + (
        message if kind == "ValueError" else f"{kind}: {message}"
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but every failure is one line and exit status 1: a bad or missing
    flag, a config file that is missing, fails to import or raises (with its file and
    line), an unknown config key, a positional argument. `--help` exits with 0."""
    try:
        remaining = flags.FLAGS(argv)
    except SystemExit:  # absl's --help exits with 1.
        if any(arg.split("=")[0] in _HELP_FLAGS for arg in argv[1:]):
            sys.exit(0)
        raise
    except (AttributeError, KeyError) as error:
        if _where(error) != "?":  # Raised in a config file's code (config.model.dpeth).
            print(f"error: {_config_code_error(error)}", file=sys.stderr)
        else:  # How config_flags reports an unknown key in an override.
            print(
                f"error: unknown key in a --config.KEY override: {one_line(error)}"
                f"{_closest_override(argv, one_line(error))}",
                file=sys.stderr,
            )
    except flags.Error as error:
        print(f"error: {_config_file_error(error) or one_line(error)}", file=sys.stderr)
    except Exception as error:  # noqa: BLE001 - a config file that fails to import or run.
        print(f"error: {_config_code_error(error)}", file=sys.stderr)
    else:
        if len(remaining) <= 1:
            return remaining
        print(
            f"error: unexpected arguments {remaining[1:]} (flags are --name=value)",
            file=sys.stderr,
        )
    sys.exit(1)


def _resume_command() -> str:
    """The command line of this run, to print after an interruption."""
    return shlex.join(["python", "-m", "wsda_jax.main", *sys.argv[1:]])


# Recorded from a command's start: before the train loop's watcher takes them over, they
# unwind the command (locks released) and end it with one line. (With several processes,
# jax.distributed.initialize takes SIGTERM over for its preemption sync point.)
RECORDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_reporting_errors(run: Callable[[list[str]], None], argv: list[str]) -> None:
    """Calls run(argv); bad input and interruptions end the process with one line.

    Ctrl-C and SIGTERM are recorded from here on (`errors.SignalRecorder`), so that one
    that Python discarded during start-up still stops the run, and its discard prints
    nothing."""
    recorder = errors.SignalRecorder()
    previous = {signum: signal.signal(signum, recorder) for signum in RECORDED_SIGNALS}
    previous_unraisable_hook, sys.unraisablehook = sys.unraisablehook, recorder.discard_unraisable
    try:
        _report_errors(run, argv, recorder)
    finally:  # For callers in process (tests): the handlers they had.
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if sys.unraisablehook == recorder.discard_unraisable:  # Not a filter added since.
            sys.unraisablehook = previous_unraisable_hook


def _report_errors(
    run: Callable[[list[str]], None], argv: list[str], recorder: errors.SignalRecorder
) -> None:
    try:
        run(argv)
        if recorder.received is not None:  # Its KeyboardInterrupt was discarded.
            raise KeyboardInterrupt
    except BAD_INPUT as error:
        logging.debug("%s", traceback.format_exc())  # Shown with --verbosity=1.
        print(f"error: {one_line(error)}", file=sys.stderr)
        if isinstance(error, errors.CheckpointWriteError):
            # Orbax's save threads may still wait (minutes) on the failed save: leave now.
            sys.stderr.flush()
            os._exit(1)
        sys.exit(1)
    except KeyboardInterrupt:  # A signal before the train loop, or outside training.
        signum = recorder.received or signal.SIGINT
        name = signal.Signals(signum).name
        print(f"Interrupted ({name}) outside the train loop: nothing new to save.", file=sys.stderr)
        sys.exit(128 + signum)
    except errors.Interrupted as error:
        print(
            f"Interrupted by {signal.Signals(error.signum).name} at step {error.step}; its "
            f"checkpoint is saved. Resume with: {_resume_command()}",
            file=sys.stderr,
        )
        sys.exit(128 + error.signum)


def run_tool(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` for a command-line tool: a bad flag or bad input (a ValueError of
    an impossible setting, a missing file) ends the process with one `error:` line and
    status 1, not a traceback."""
    app.run(lambda argv: run_reporting_errors(main, argv), flags_parser=parse_flags)
