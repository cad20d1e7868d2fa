"""Orbax checkpoints of the whole run: train state, grain iterator state and config.

One `ocp.CheckpointManager` per run directory (`WORKDIR/checkpoints/STEP/`) with three
items: `state` (the TrainState pytree, `StandardSave`), `train_iter` (the grain iterator
position, `grain.checkpoint.CheckpointSave`, one JSON file per process) and `config`
(`JsonSave`, for the record). Saves are asynchronous; call `manager.wait_until_finished()`
before the process exits.

Retention: the last `config.keep_checkpoints` steps plus the single best step by the
`miou` metric passed to `save` (Orbax `LatestN` OR `BestN(n=1)`); checkpoints saved
without metrics are only kept while they are among the latest. `best_fn` is also set so
that Orbax writes the metrics next to the step and `manager.best_step()` works.

Restoring uses an abstract state whose leaves carry the shardings of the *current* mesh,
so a checkpoint written on 4 devices restores on 1 and vice versa.

Faults: a checkpoint that cannot be read (truncated, garbage) is moved aside to
`checkpoints/corrupt/STEP` with one warning line and the previous one is used, so the
run writes that step again; a checkpoint of another model (other width or depth) is an
error naming the first leaf that differs, and is left alone. A checkpoint directory
that stops being writable fails the next save at once with one line (the last good
checkpoint stays). Unfinished saves (`STEP.orbax-checkpoint-tmp*`, left by a kill) are
removed when the manager opens.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import signal
import sys
import tempfile
import types
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

ITEM_NAMES = ("state", "train_iter", "config")
BEST_METRIC = "miou"
CORRUPT_DIR = "corrupt"


class DifferentModelError(ValueError):
    """A checkpoint whose state does not fit this config's model (not a corrupt file)."""


class CheckpointWriteError(ValueError):
    """The checkpoint directory cannot be written; the run must stop."""


def checkpoint_dir(workdir: str) -> str:
    """Where a run keeps its checkpoints."""
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")


def _best_fn(metrics: Mapping[str, float]) -> float:
    return float(metrics[BEST_METRIC])


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
    return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


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
        raise _write_error(manager, error) from error


def _write_error(manager: ocp.CheckpointManager, error: OSError) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"cannot write checkpoints to {manager.directory}: {error.strerror or error} "
        f"(the last good checkpoint is {_last_committed(manager)})"
    )


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
    checkpoint that was written."""
    try:
        yield
    except OSError as error:
        raise _write_error(manager, error) from error


def _last_committed(manager: ocp.CheckpointManager) -> str:
    """'step N' of the newest finished checkpoint on disk ('unknown' if unlistable)."""
    try:
        steps = [int(name) for name in os.listdir(manager.directory) if name.isdigit()]
    except OSError:
        return "unknown"
    return f"step {max(steps)}" if steps else "none"


def abstract_on_mesh(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """ShapeDtypeStructs of `tree`, replicated over `mesh` (the target of a restore)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


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
        _check_same_model(step, abstract_state, manager.item_metadata(step)["state"])
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if train_iter is not None:
            items["train_iter"] = grain.checkpoint.CheckpointRestore(train_iter)
        return manager.restore(step, args=ocp.args.Composite(**items)).state

    return newest_readable(manager, restore, set_aside=set_aside)


def newest_readable(
    manager: ocp.CheckpointManager, restore: Callable[[int], Any], *, set_aside: bool
) -> tuple[Any, int] | None:
    """`(restore(step), step)` for the newest step of `manager` that `restore` can read.

    Unreadable steps are skipped with one warning each (and moved aside when
    `set_aside`); DifferentModelError goes through. Raises a one-line ValueError when
    no step is readable, returns None when there are no steps.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            with _quiet_failed_restore():
                return restore(step), step
        except DifferentModelError:
            raise
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back.
            _report_unreadable(manager, step, error, set_aside=set_aside)
    if steps:
        raise ValueError(f"no readable checkpoint in {manager.directory} (tried steps {steps})")
    return None


def _report_unreadable(
    manager: ocp.CheckpointManager, step: int, error: Exception, *, set_aside: bool
) -> None:
    """One warning line; the step's folder moves to corrupt/ when `set_aside`."""
    path = os.path.join(str(manager.directory), str(step))
    reason = f"{type(error).__name__}: {_first_line(error)}"
    if set_aside:
        moved = _set_aside(str(manager.directory), step) if jax.process_index() == 0 else ""
        manager.reload()
        where = f"moved to {moved}" if moved else "set aside"
        logging.warning(
            "Checkpoint %s is unreadable (%s); %s, falling back to the previous one.",
            path,
            reason,
            where,
        )
    else:
        logging.warning(
            "Checkpoint %s is unreadable (%s); falling back to the previous one.", path, reason
        )


def _first_line(error: BaseException) -> str:
    """The start of the error's message (without TensorStore's spec dump)."""
    text = str(error).strip().split(" See full TensorStore details")[0]
    return text.splitlines()[0][:300] if text else ""


def _set_aside(directory: str, step: int) -> str:
    """Moves `directory/STEP` to `directory/corrupt/STEP` (a fresh name if that exists)."""
    target_dir = os.path.join(directory, CORRUPT_DIR)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, str(step))
    suffix = 1
    while os.path.exists(target):
        target = os.path.join(target_dir, f"{step}.{suffix}")
        suffix += 1
    os.rename(os.path.join(directory, str(step)), target)
    return target


def _leaf_name(path: tuple[Any, ...]) -> str:
    """'params/backbone/conv1/kernel' for a pytree path of dict keys, attributes or indices."""
    return "/".join(
        str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path
    )


def _stored_shape(leaf: Any) -> tuple[int, ...]:
    """The shape Orbax stores: a typed PRNG key is saved as its key data."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_leaf_name(path): _stored_shape(leaf) for path, leaf in leaves}


def _check_same_model(step: int, abstract_state: Any, metadata: Any) -> None:
    """Raises DifferentModelError naming the first leaf whose shape differs (or that
    only one side has) between this config's state and checkpoint `step`'s metadata."""
    found = _leaf_shapes(getattr(metadata, "tree", metadata))
    expected = _leaf_shapes(abstract_state)
    extra = sorted(set(found) - set(expected))
    problem = _shape_problem(expected, found) or (
        f"{extra[0]} is in the checkpoint but not in this config" if extra else None
    )
    if problem:
        raise DifferentModelError(f"checkpoint {step} was written by a different model: {problem}")


def _shape_problem(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
) -> str | None:
    """The first difference between two {leaf: shape} tables, in words."""
    for name, shape in expected.items():
        if name not in found:
            return f"{name} is missing from the checkpoint"
        if found[name] != shape:
            return f"{name} has shape {found[name]}, this config {shape}"
    return None


def _is_restore_noise(exc_value: BaseException | None, exc_traceback: Any) -> bool:
    """An error that the abandoned reads of a failed restore raise in background threads:
    'Event loop is closed' (their loop ended with the restore) or Orbax's own read error."""
    if isinstance(exc_value, RuntimeError) and str(exc_value) == "Event loop is closed":
        return True
    frame = exc_traceback
    while frame is not None:
        if "/orbax/" in frame.tb_frame.f_code.co_filename:
            return True
        frame = frame.tb_next
    return False


class _AsyncioRestoreNoise(std_logging.Filter):
    """asyncio's 'exception was never retrieved' for the futures of a failed restore."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
            return True
        return not _is_restore_noise(record.exc_info[1], record.exc_info[2])


class _RestoreNoiseFilter:
    """Drops the restore noise from sys.unraisablehook and the asyncio logger while on."""

    def __init__(self) -> None:
        self._previous_hook: Callable[[Any], None] | None = None
        self._log_filter = _AsyncioRestoreNoise()
        self.keep = False  # Set once a restore failed: its abandoned reads outlive it.

    def _hook(self, unraisable: Any) -> None:
        if not _is_restore_noise(unraisable.exc_value, unraisable.exc_traceback):
            (self._previous_hook or sys.__unraisablehook__)(unraisable)

    def install(self) -> None:
        if self._previous_hook is None:
            self._previous_hook = sys.unraisablehook
            sys.unraisablehook = self._hook
            std_logging.getLogger("asyncio").addFilter(self._log_filter)

    def remove(self) -> None:
        if self._previous_hook is not None and not self.keep:
            sys.unraisablehook = self._previous_hook
            self._previous_hook = None
            std_logging.getLogger("asyncio").removeFilter(self._log_filter)


_RESTORE_NOISE = _RestoreNoiseFilter()


@contextlib.contextmanager
def _quiet_failed_restore():
    """Around one restore. When it fails, Orbax leaves reads running in background
    threads whose event loop has closed; each then prints an 'Event loop is closed'
    traceback (sys.unraisablehook) or an asyncio 'exception was never retrieved' log,
    hundreds of lines in all, then or later. Filters for exactly those are on during
    the restore and stay on after a failed one, so that one warning line per unreadable
    checkpoint is what the user sees."""
    _RESTORE_NOISE.install()
    try:
        yield
    except Exception:
        _RESTORE_NOISE.keep = True
        raise
    finally:
        _RESTORE_NOISE.remove()


def _resolve_init_dir(path: str) -> str:
    """Accepts a stage-1 workdir or its `checkpoints/` directory."""
    path = os.path.abspath(os.path.expanduser(path))
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def _first_mismatch(expected: Any, found: Mapping[str, Any], prefix: str) -> str | None:
    """Names the first leaf of `expected` that is missing or has another shape in `found`."""
    return _shape_problem(
        {f"{prefix}/{name}": shape for name, shape in _leaf_shapes(expected).items()},
        {f"{prefix}/{name}": shape for name, shape in _leaf_shapes(found).items()},
    )


def load_init_from(path: str, state: Any, mesh: jax.sharding.Mesh, *, teacher: str = "ema") -> Any:
    """Student and teacher of stage 2 from a stage-1 checkpoint.

    The student gets the checkpoint's params and batch_stats. The teacher gets the
    checkpoint's EMA teacher (`teacher='ema'`, as the reference loads its EMA weights)
    where the checkpoint has one, else a copy of the student (`teacher='student'`, or a
    checkpoint without a teacher). Everything else of `state` (optimizer, prototypes,
    step, rng) stays fresh. Raises a one-line ValueError naming the first parameter
    whose shape does not match.
    """
    directory = _resolve_init_dir(path)
    if not os.path.isdir(directory):
        raise ValueError(f"config.init.init_from={path!r}: no such checkpoint directory")
    with ocp.CheckpointManager(
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
                problem = _first_mismatch(getattr(state, name), metadata.get(name, {}), name)
                if problem:
                    raise DifferentModelError(
                        f"checkpoint {step} was written by a different model: {problem}"
                    )
            target = abstract_on_mesh({name: metadata[name] for name in names}, mesh)
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
            found = newest_readable(manager, read, set_aside=False)
        except ValueError as error:
            raise ValueError(f"config.init.init_from={path!r}: {error}") from error
        if found is None:
            raise ValueError(f"config.init.init_from={path!r}: no checkpoint in {directory}")
        restored, step = found
    state = with_student_and_teacher(state, restored["params"], restored["batch_stats"])
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


def with_student_and_teacher(state: Any, params: Any, batch_stats: Any) -> Any:
    """`state` with these variables for the student and a copy for the teacher.

    The copy matters: the train step donates the state, and one buffer cannot be donated
    twice.
    """
    return state.replace(
        params=params,
        batch_stats=batch_stats,
        teacher_params=jax.tree.map(jnp.copy, params),
        teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
    )


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
        # keeps its default (KeyboardInterrupt); SIGTERM reaches JAX's sync point.
        signals = self.SIGNALS if jax.process_count() == 1 else (signal.SIGTERM,)
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def should_stop(self, manager: ocp.CheckpointManager, step: int) -> bool:
        """True when this step must be saved and the run must stop."""
        if jax.process_count() > 1:
            return manager.reached_preemption(step)
        return self.requested
