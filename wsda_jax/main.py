"""Entry point: `python -m wsda_jax.main --config=configs/X.py --workdir=DIR [--mode=...]`.

Modes: `train` (default; resumes from DIR), `eval` (latest checkpoint of DIR on the
target val split), `predict` (colourised PNGs of `--input_dir` images in `--output_dir`).

Several processes (multi-host GPU or TPU): `jax.distributed.initialize()` is called when
the environment says this is one of several processes: JAX_COORDINATOR_ADDRESS set, a
SLURM job with more than one task (SLURM_NTASKS), Open MPI (OMPI_COMM_WORLD_SIZE), a
multi-host Cloud TPU (TPU_WORKER_HOSTNAMES with a comma), or WSDA_DISTRIBUTED=1 (the
launch scripts set it); elsewhere give `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` to every process. Bad input (config file, override
key, workdir, dataset not prepared, init_from mismatch, process flags, a workdir in use
by another run) exits with one line on stderr and status 1. SIGTERM or Ctrl-C during
training saves a checkpoint and exits with 128 + the signal's number, printing the
command that resumes.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import multiprocessing
import os
import shlex
import signal
import sys
import tempfile
import traceback

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

# Spawned data-loading workers (grain's mp_prefetch) re-import this module. On preemption
# the whole process group receives SIGTERM; workers that died would leave the trainer
# blocked on its next batch instead of saving, so they ignore SIGTERM and are stopped by
# the trainer when it exits.
if multiprocessing.parent_process() is not None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group too.

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluations.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "What to run.")
flags.DEFINE_string("input_dir", None, "predict: folder of .png/.jpg images.")
flags.DEFINE_string("output_dir", None, "predict: folder for colourised predictions.")
flags.DEFINE_string(
    "coordinator_address", None, "Several processes by hand: host:port of process 0."
)
flags.DEFINE_integer("num_processes", None, "Several processes by hand: how many.")
flags.DEFINE_integer("process_id", None, "Several processes by hand: this one's index.")
flags.mark_flags_as_required(["config", "workdir"])


def _distributed_arguments() -> dict:
    """The explicit jax.distributed.initialize arguments; all or none must be given."""
    given = {
        "coordinator_address": FLAGS.coordinator_address,
        "num_processes": FLAGS.num_processes,
        "process_id": FLAGS.process_id,
    }
    if any(value is not None for value in given.values()):
        missing = [f"--{name}" for name, value in given.items() if value is None]
        if missing:
            raise ValueError(f"several processes by hand need {', '.join(missing)} as well")
        if not 0 <= FLAGS.process_id < FLAGS.num_processes:
            raise ValueError(
                f"--process_id={FLAGS.process_id} must be in [0, {FLAGS.num_processes})"
            )
        return given
    return {}


def _is_multiprocess(distributed_arguments: dict) -> bool:
    env = os.environ
    return bool(
        distributed_arguments
        or env.get("WSDA_DISTRIBUTED") == "1"
        or env.get("JAX_COORDINATOR_ADDRESS")
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )


def _load_config() -> ml_collections.ConfigDict:
    """FLAGS.config, which config_flags loads (and overrides) lazily on first access."""
    try:
        config = FLAGS.config
        config.to_json()  # Loaded lazily: fail here, before any work, if it cannot load.
        return config
    except OSError as error:
        raise ValueError(f"cannot load --config: {error}") from error
    except (AttributeError, KeyError) as error:
        raise ValueError(f"bad --config.KEY override: {error}") from error


def _check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        # A unique name: several processes may share the workdir.
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
            pass
    except OSError as error:
        raise ValueError(f"--workdir={workdir} cannot be written: {error.strerror}") from error


# Orbax's error logs (with tracebacks) of a save that failed in its background thread;
# the run stops with one line naming the cause instead (checkpointing.CheckpointWriteError).
_ORBAX_SAVE_FAILURES = (
    "in background save thread",
    "Save Finalize thread",
    "_SignalingThread.run() raised",
)


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
    """Drops Orbax's many INFO lines per checkpoint (and its warning that a periodic
    checkpoint carries no mIoU, and its tracebacks of a failed background save); other
    warnings still show."""
    if "/orbax/" not in record.pathname:
        return True
    message = record.getMessage()
    if any(failure in message for failure in _ORBAX_SAVE_FAILURES):
        return False
    return record.levelno >= std_logging.WARNING and "tracked_metric" not in message


def _resume_command() -> str:
    """The command line of this run, to print after an interruption."""
    return shlex.join(["python", "-m", "wsda_jax.main", *sys.argv[1:]])


def _workdir_lock(workdir: str, jax_module) -> contextlib.AbstractContextManager:
    """The workdir lock for a run that writes the workdir (process 0 of several)."""
    from wsda_jax import workdir_lock

    if jax_module.process_index() != 0:
        return contextlib.nullcontext()
    return workdir_lock.hold(workdir)


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_orbax)
    config = _load_config()
    from wsda_jax import config_lib  # No JAX: a bad value fails before any work.

    config_lib.validate_ranges(config)
    distributed_arguments = _distributed_arguments()  # Bad flags fail before any work.
    from wsda_jax import cpu_flags  # Must run before JAX initialises its backends.

    cpu_flags.apply_cpu_defaults()
    import jax

    from wsda_jax import train

    if _is_multiprocess(distributed_arguments):
        jax.distributed.initialize(**distributed_arguments)
    logging.info(
        "Process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    workdir = os.path.expanduser(FLAGS.workdir)
    if FLAGS.mode == "train":
        _check_workdir(workdir)
        with _workdir_lock(workdir, jax):
            train.train_and_evaluate(config, workdir)
        if jax.process_index() == 0:
            print(train.progress_summary(workdir))
    elif FLAGS.mode == "eval":
        _check_workdir(workdir)
        with _workdir_lock(workdir, jax):
            train.evaluate_checkpoint(config, workdir)
    else:
        if not (FLAGS.input_dir and FLAGS.output_dir):
            raise ValueError("--mode=predict needs --input_dir and --output_dir")
        written = train.predict_images(config, workdir, FLAGS.input_dir, FLAGS.output_dir)
        logging.info("Wrote %d predictions to %s.", len(written), FLAGS.output_dir)


def main(argv: list[str]) -> None:
    try:
        _run(argv)
    except (ValueError, FileNotFoundError, PermissionError, KeyError) as error:
        logging.debug("%s", traceback.format_exc())  # Shown with --verbosity=1.
        print(f"error: {_one_line(error)}", file=sys.stderr)
        if type(error).__name__ == "CheckpointWriteError":  # checkpointing's, not imported.
            # Orbax's save threads may still wait (minutes) on the failed save: leave now.
            sys.stderr.flush()
            os._exit(1)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before the train loop, or outside training.
        print("Interrupted (SIGINT) outside the train loop: nothing new to save.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as error:
        from wsda_jax import train

        if not isinstance(error, train.Interrupted):
            raise
        print(
            f"Interrupted by {signal.Signals(error.signum).name} at step {error.step}; its "
            f"checkpoint is saved. Resume with: {_resume_command()}",
            file=sys.stderr,
        )
        sys.exit(128 + error.signum)


def _one_line(error: BaseException) -> str:
    """The message of `error` on one line (the last line if it quotes a traceback)."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    if isinstance(error, KeyError | AttributeError) and text[:1] in "'\"":
        text = text[1:-1]  # str(KeyError) adds quotes.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if "Traceback" in text else " ".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but a bad flag (missing config file, unknown key) is one line."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as error:  # How config_flags reports an unknown key.
        print(f"error: unknown key in a --config.KEY override: {_one_line(error)}", file=sys.stderr)
    except flags.Error as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
