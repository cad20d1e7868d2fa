"""Entry point: `python -m wsda_jax.main --config=configs/X.py --workdir=DIR [--mode=...]`.

Modes: `train` (default; resumes from DIR), `eval` (latest checkpoint of DIR on the
target val split), `predict` (colourised PNGs of `--input_dir` images in `--output_dir`),
`compile` (does the config fit `--target`? one line, no --workdir; docs/aot.md).
Several processes: see `parallel.initialize_processes` (environment detection) or give
`--coordinator_address --num_processes --process_id`. Bad input exits with one line on
stderr and status 1; SIGTERM or Ctrl-C during training saves a checkpoint and exits with
128 + the signal's number (`cli_errors`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal

from absl import app, flags, logging
from ml_collections import config_flags

from wsda_jax import cli_errors

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
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "compile"], "What to run.")
flags.DEFINE_string("target", None, "compile: h100, h200, a100, a100-40gb, tpu-v4-8, ...")
flags.DEFINE_string("input_dir", None, "predict: folder of .png/.jpg images.")
flags.DEFINE_string("output_dir", None, "predict: folder for colourised predictions.")
flags.DEFINE_string("coordinator_address", None, "Several processes by hand: host:port of 0.")
flags.DEFINE_integer("num_processes", None, "Several processes by hand: how many.")
flags.DEFINE_integer("process_id", None, "Several processes by hand: this one's index.")
flags.mark_flags_as_required(["config"])


def _load_config():
    """FLAGS.config, which config_flags loads (and overrides) lazily on first access."""
    try:
        config = FLAGS.config
        config.to_json()  # Loaded lazily: fail here, before any work, if it cannot load.
        return config
    except OSError as error:
        raise ValueError(f"cannot load --config: {error}") from error
    except (AttributeError, KeyError) as error:
        raise ValueError(f"bad --config.KEY override: {error}") from error


def _run(argv: list[str]) -> None:
    del argv  # cli_errors.parse_flags refuses positional arguments.
    logging.get_absl_handler().addFilter(cli_errors.quiet_orbax_logs)
    config = _load_config()
    from wsda_jax import aot_targets, config_lib, cpu_flags, gpu_flags  # No JAX yet.

    config_lib.validate_values(config)
    if FLAGS.mode == "compile":  # Compiled for an accelerator this host need not have.
        return print(aot_targets.compile_mode(config, FLAGS.target))
    if not FLAGS.workdir:
        raise ValueError(f"--mode={FLAGS.mode} needs --workdir")
    cpu_flags.apply_cpu_defaults()  # Must run before JAX initialises its backends.
    gpu_flags.apply_gpu_defaults()  # Only when JAX will find a CUDA GPU.
    import jax

    from wsda_jax import parallel, train, workdir_lock

    by_hand = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    parallel.initialize_processes(parallel.distributed_arguments(*by_hand))
    logging.info(
        "Process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))  # The one normalisation.
    if FLAGS.mode == "predict":
        if not (FLAGS.input_dir and FLAGS.output_dir):
            raise ValueError("--mode=predict needs --input_dir and --output_dir")
        written = train.predict_images(config, workdir, FLAGS.input_dir, FLAGS.output_dir)
        logging.info("Wrote %d predictions to %s.", len(written), FLAGS.output_dir)
        return
    config_lib.validate(config, jax.device_count())  # Before the workdir is made.
    workdir_lock.check_writable(workdir)
    with workdir_lock.hold_on_writer(workdir, jax.process_index()):
        if FLAGS.mode == "eval":
            train.evaluate_checkpoint(config, workdir)
            return
        train.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        print(train.progress_summary(workdir))


def main(argv: list[str]) -> None:
    cli_errors.run_reporting_errors(_run, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli_errors.parse_flags)
