"""Orbax checkpoints of the whole run: train state, grain iterator state and config.

One `ocp.CheckpointManager` per run directory (`WORKDIR/checkpoints/STEP/`) with three
items: `state` (the TrainState pytree, `StandardSave`), `train_iter` (the grain iterator
position, `grain.checkpoint.CheckpointSave`, one JSON file per process) and `config`
(`JsonSave`, for the record). Saves are asynchronous; call `manager.wait_until_finished()`
before the process exits.

Retention: the last `config.keep_checkpoints` steps plus the single best step by the
`miou` metric passed to `save` (Orbax `LatestN` OR `BestN(n=1)`); checkpoints saved
without metrics are only kept while they are among the latest. `best_fn` is also set so
that Orbax writes the metrics next to the step and `manager.best_step()` works. A step
whose metrics file cannot be read (garbage, empty) is kept and not ranked, with one
warning naming the file, rather than failing every manager (Orbax reads all the steps'
metrics when it opens a folder).

Restoring uses an abstract state whose leaves carry the shardings of the *current* mesh,
so a checkpoint written on 4 devices restores on 1 and vice versa.

Faults (`checkpoint_recovery`): a checkpoint that cannot be read (truncated, garbage)
is moved aside to `checkpoints/corrupt/STEP` with one warning line and the previous one
is used, so the run writes that step again; a checkpoint of another model (other width
or depth) is an error naming the first leaf that differs, and is left alone. A checkpoint directory
that stops being writable fails the next save at once with one line (the last good
checkpoint stays). Unfinished saves (`STEP.orbax-checkpoint-tmp*`, left by a kill) are
removed when the manager opens.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import tempfile
import types
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from wsda_jax import checkpoint_recovery, config_model, errors, parallel, train_state

BEST_METRIC = "miou"


DifferentModelError = checkpoint_recovery.DifferentModelError
check_nothing_set_aside = checkpoint_recovery.check_nothing_set_aside


def checkpoint_dir(workdir: str) -> str:
    """Where a run keeps its checkpoints."""
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")


def _best_fn(metrics: Mapping[str, float]) -> float:
    return float(metrics[BEST_METRIC])


def check_same_run(
    config: ml_collections.ConfigDict, workdir: str, *, inference: bool = False
) -> None:
    """Refuses (one-line ValueError) a workdir whose checkpoints were saved by another run
    (`checkpoint_recovery.check_same_run`; for eval and predict only the model and stage
    must match); call before the manager is made."""
    keys = checkpoint_recovery.INFERENCE_IDENTITY if inference else checkpoint_recovery.IDENTITY
    checkpoint_recovery.check_same_run(config, workdir, checkpoint_dir(workdir), keys)


def make_manager(
    directory: str, config: ml_collections.ConfigDict, *, owner: bool = True
) -> ocp.CheckpointManager:
    """An async manager keeping the last `config.keep_checkpoints` and the best by mIoU.

    `owner`: this run holds the workdir (its lock), so the unfinished saves it finds are
    leftovers of a killed run and are removed; a reader (predict) leaves them alone, as
    they may be another run's saves in progress.
    """
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(n=config.keep_checkpoints),
            checkpoint_managers.BestN(
                get_metric_fn=_best_fn, n=1, keep_checkpoints_without_metrics=False
            ),
            checkpoint_recovery.KeepUnreadableMetrics(directory),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_fn,
        best_mode="max",
        preservation_policy=policy,
        enable_async_checkpointing=True,
        # The step's folder is made in the caller's thread, so that a folder that cannot
        # be created raises from `save` (made in the background, the failure left the
        # save waiting up to 20 minutes for a "created" signal); the arrays are still
        # written in the background.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        create=True,
        cleanup_tmp_directories=owner,  # Saves cut short by a kill.
    )
    return checkpoint_recovery.Manager(directory, options=options, item_handlers=_item_handlers())


def _item_handlers() -> dict[str, Any]:
    """The handlers of the three items, so that their metadata can be read before a
    restore (the shape check of `restore_latest`)."""
    return {
        "state": ocp.StandardCheckpointHandler(),
        "train_iter": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }


def _check_writable(manager: ocp.CheckpointManager) -> None:
    """Raises CheckpointWriteError when no file can be created in the manager's folder,
    before Orbax starts a save that it could not finish."""
    try:
        with tempfile.NamedTemporaryFile(dir=str(manager.directory), prefix=".write_test"):
            pass
    except OSError as error:
        raise write_error(manager, error) from error


# The reasons a write fails, as the operating system words them; TensorStore's errors (a
# ValueError) quote them inside long messages.
_WRITE_FAILURES = tuple(
    os.strerror(code)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
)


# A full or read-only disk: whatever the run was writing, it cannot go on.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def write_error(manager: ocp.CheckpointManager, error: Exception) -> errors.CheckpointWriteError:
    """The one line of a failed write of the disk (a checkpoint's, or while training the
    logs' or evaluations'), naming the last good checkpoint."""
    text = str(error)
    reason = getattr(error, "strerror", None) or next(
        (failure for failure in _WRITE_FAILURES if failure in text), text.splitlines()[0][:300]
    )
    return errors.CheckpointWriteError(
        f"cannot write checkpoints to {manager.directory}: {reason} "
        f"(the last good checkpoint is {_last_committed(manager)})"
    )


@contextlib.contextmanager
def disk_errors(manager: ocp.CheckpointManager):
    """A full disk met while training (logs, evaluations) as the one line of a failed
    checkpoint write, naming the last good checkpoint."""
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        raise write_error(manager, error) from error


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    train_iter: Any,
    config: ml_collections.ConfigDict,
    *,
    metrics: Mapping[str, float] | None = None,
) -> bool:
    """Starts an asynchronous save of `step`; returns False if that step is already saved.

    `metrics` (with key `miou`) ranks the checkpoint for best-by-mIoU retention. The
    iterator position is captured now, before this call returns.
    """
    if step in manager.all_steps():
        return False
    _check_writable(manager)
    checkpoint_recovery.quiet_background_writes()
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        train_iter=grain.checkpoint.CheckpointSave(train_iter),
        config=ocp.args.JsonSave(json.loads(config.to_json())),
    )
    with _save_errors(manager):
        return manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=True)


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Waits for the pending save; a failed background save is one CheckpointWriteError."""
    with _save_errors(manager):
        manager.wait_until_finished()


@contextlib.contextmanager
def _save_errors(manager: ocp.CheckpointManager):
    """A failed (background) save of Orbax as one CheckpointWriteError naming the last
    checkpoint that was written (an OSError, or TensorStore's ValueError of a failed
    write); the abandoned writes' 'Event loop is closed' noise is filtered, as for a
    failed restore."""
    try:
        with checkpoint_recovery.quiet_failed_restore():
            yield
    except (OSError, ValueError) as error:
        raise write_error(manager, error) from error


def _last_committed(manager: ocp.CheckpointManager) -> str:
    """'step N' of the newest finished checkpoint on disk ('unknown' if unlistable)."""
    try:
        steps = [int(name) for name in os.listdir(manager.directory) if name.isdigit()]
    except OSError:
        return "unknown"
    return f"step {max(steps)}" if steps else "none"


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    train_iter: Any | None = None,
    *,
    set_aside: bool = True,
) -> tuple[Any, int] | None:
    """Restores the newest readable checkpoint into `abstract_state` (and `train_iter`).

    Returns `(state, step)`, or None when there is no checkpoint. A checkpoint that
    fails to restore (e.g. truncated) gets one warning line, is moved to
    `checkpoints/corrupt/STEP` when `set_aside` (so that the run writes the step again;
    process 0 moves it) and the previous one is tried. A checkpoint of another model
    raises DifferentModelError (one line) and is left in place.
    """

    def restore(step: int) -> Any:
        metadata = manager.item_metadata(step)["state"]
        checkpoint_recovery.check_same_model(step, abstract_state, metadata)
        target, absent = checkpoint_recovery.restore_target(abstract_state, metadata)
        items = {"state": ocp.args.StandardRestore(target)}
        if train_iter is not None:
            items["train_iter"] = grain.checkpoint.CheckpointRestore(train_iter)
        restored = manager.restore(step, args=ocp.args.Composite(**items)).state
        return abstract_state.replace(**restored) if absent else restored

    return checkpoint_recovery.newest_readable(manager, restore, set_aside=set_aside)


def saved_config(directory: str, step: int) -> dict[str, Any] | None:
    """The config saved with checkpoint `step` of `directory` (a dict), None if unreadable."""
    config = checkpoint_recovery.saved_run_configs(directory).get(step)
    if config is None:
        logging.warning("No readable config in checkpoint %d of %s.", step, directory)
    return config


def _saved_model_name(directory: str, step: int) -> str:
    """' (ResNet-18 w16)': the network checkpoint `step` was written with, in words, for an
    error message; '' when its saved config is unreadable or lacks the model keys."""
    saved = checkpoint_recovery.saved_run_configs(directory).get(step)
    try:
        return f" ({config_model.model_name(ml_collections.ConfigDict(saved))})"
    except (AttributeError, KeyError, TypeError):
        return ""


def init_dir(path: str) -> str:
    """The checkpoint directory of config.init.init_from `path` (a stage-1 workdir or its
    `checkpoints/` directory); a one-line ValueError when there is none, or it holds no
    step folder."""
    given, path = path, os.path.abspath(os.path.expanduser(path))
    nested = os.path.join(path, "checkpoints")
    directory = nested if os.path.isdir(nested) else path
    if not os.path.isdir(directory):
        raise ValueError(f"config.init.init_from={given!r}: no such checkpoint directory")
    if not any(name.isdigit() for name in os.listdir(directory)):
        raise ValueError(f"config.init.init_from={given!r}: no checkpoint in {directory}")
    return directory


def load_init_from(path: str, state: Any, mesh: jax.sharding.Mesh, *, teacher: str = "ema") -> Any:
    """Student and teacher of stage 2 from a stage-1 checkpoint.

    The student gets the checkpoint's params and batch_stats. The teacher gets the
    checkpoint's EMA teacher (`teacher='ema'`, as the reference loads its EMA weights)
    where the checkpoint has one, else a copy of the student (`teacher='student'`, or a
    checkpoint without a teacher). Everything else of `state` (optimizer, prototypes,
    step, rng) stays fresh. Raises a one-line ValueError naming the first parameter
    whose shape does not match.
    """
    directory = init_dir(path)
    with checkpoint_recovery.Manager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "train_iter": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    ) as manager:

        def read(step: int) -> Any:
            metadata = manager.item_metadata(step)["state"].tree
            names = ["params", "batch_stats"]
            if teacher == "ema" and "teacher_params" in metadata:
                names += ["teacher_params", "teacher_batch_stats"]
            for name in names:
                problem = checkpoint_recovery.first_mismatch(
                    getattr(state, name), metadata.get(name, {}), name
                )
                if problem:
                    model = _saved_model_name(directory, step)
                    raise DifferentModelError(
                        f"checkpoint {step} was written by a different model{model}: {problem}"
                    )
            target = parallel.abstract_on(
                {name: metadata[name] for name in names}, parallel.replicated(mesh)
            )
            # A partial restore: only the variables are read from the stage-1 state.
            return manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=jax.tree.map(_restore_args, target),
                        partial_restore=True,
                    )
                ),
            ).state

        try:  # Another run's workdir: unreadable steps are skipped, not moved.
            found = checkpoint_recovery.newest_readable(manager, read, set_aside=False)
        except ValueError as error:
            raise ValueError(f"config.init.init_from={path!r}: {error}") from error
        if found is None:
            raise ValueError(f"config.init.init_from={path!r}: no checkpoint in {directory}")
        restored, step = found
    state = train_state.with_student_and_teacher(state, restored["params"], restored["batch_stats"])
    if "teacher_params" in restored:
        state = state.replace(
            teacher_params=restored["teacher_params"],
            teacher_batch_stats=restored["teacher_batch_stats"],
        )
        source = "its EMA teacher"
    else:
        source = "a copy of the student"
    logging.info(
        "Initialised the student from %s (step %d) and the teacher from %s.",
        directory,
        step,
        source,
    )
    return state


def _restore_args(leaf: jax.ShapeDtypeStruct) -> ocp.ArrayRestoreArgs:
    return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype)


class PreemptionWatcher:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the train loop polls, so it can save
    and exit cleanly; `signum` is the signal that came (None if none). A second signal
    while the run is stopping ends the process at once (exit status 128 + signal).

    On several processes the local flag alone would desynchronise the hosts, so there the
    Orbax/JAX preemption sync point (`manager.reached_preemption`) decides instead; JAX's
    distributed runtime catches SIGTERM itself in that case, and SIGINT is left alone.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Callable[..., Any] | int | None] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"{name} again: exiting without waiting for the checkpoint.", file=sys.stderr)
            os._exit(128 + signum)
        logging.warning("Received %s: saving a checkpoint and exiting.", name)
        self.signum = signum

    def __enter__(self) -> PreemptionWatcher:
        # With several processes a local Ctrl-C cannot stop the others in step, so it
        # keeps the command's handler (KeyboardInterrupt), and SIGTERM is left to the
        # handler jax.distributed.initialize installed (a Python one would replace it, and
        # JAX's preemption sync point would never be reached).
        signals = self.SIGNALS if jax.process_count() == 1 else ()
        for signum in signals:
            previous = signal.signal(signum, self._handle)
            self._previous[signum] = previous
            if isinstance(previous, errors.SignalRecorder) and previous.received == signum:
                # A Ctrl-C during start-up whose KeyboardInterrupt Python discarded.
                name = signal.Signals(signum).name
                logging.warning("Received %s: saving a checkpoint and exiting.", name)
                self.signum = previous.received
                previous.received = None
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def should_stop(self, manager: ocp.CheckpointManager, step: int) -> bool:
        """True when this step must be saved and the run must stop."""
        if jax.process_count() > 1:
            return manager.reached_preemption(step)
        return self.requested
