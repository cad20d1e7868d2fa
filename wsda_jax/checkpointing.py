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
"""

from __future__ import annotations

import json
import os
import signal
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


def checkpoint_dir(workdir: str) -> str:
    """Where a run keeps its checkpoints."""
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")


def _best_fn(metrics: Mapping[str, float]) -> float:
    return float(metrics[BEST_METRIC])


def make_manager(directory: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """An async manager keeping the last `config.keep_checkpoints` and the best by mIoU."""
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
        create=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=ITEM_NAMES)


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
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        train_iter=grain.checkpoint.CheckpointSave(train_iter),
        config=ocp.args.JsonSave(json.loads(config.to_json())),
    )
    return manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=True)


def abstract_on_mesh(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """ShapeDtypeStructs of `tree`, replicated over `mesh` (the target of a restore)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, train_iter: Any | None = None
) -> tuple[Any, int] | None:
    """Restores the newest readable checkpoint into `abstract_state` (and `train_iter`).

    Returns `(state, step)`, or None when there is no checkpoint. A checkpoint that fails
    to restore (e.g. truncated by a crash) is skipped with a warning naming it, and the
    previous one is tried.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if train_iter is not None:
            items["train_iter"] = grain.checkpoint.CheckpointRestore(train_iter)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back.
            logging.warning(
                "Checkpoint %s is unreadable (%s: %s); falling back to the previous one.",
                os.path.join(str(manager.directory), str(step)),
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            continue
        return restored.state, step
    if steps:
        raise ValueError(f"no readable checkpoint in {manager.directory} (tried steps {steps})")
    return None


def _resolve_init_dir(path: str) -> str:
    """Accepts a stage-1 workdir or its `checkpoints/` directory."""
    path = os.path.abspath(os.path.expanduser(path))
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def _first_mismatch(expected: Any, found: Mapping[str, Any], prefix: str) -> str | None:
    """Names the first leaf of `expected` that is missing or has another shape in `found`."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(expected)
    for path, leaf in leaves:
        node = found
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        for name in names:
            node = node.get(name) if isinstance(node, Mapping) else None
            if node is None:
                return f"{prefix}/{'/'.join(names)} is missing from the checkpoint"
        if tuple(node.shape) != tuple(leaf.shape):
            return (
                f"{prefix}/{'/'.join(names)} has shape {tuple(node.shape)} in the checkpoint "
                f"but {tuple(leaf.shape)} in this model"
            )
    return None


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
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"config.init.init_from={path!r}: no checkpoint in {directory}")
        metadata = manager.item_metadata(step)["state"].tree
        names = ["params", "batch_stats"]
        if teacher == "ema" and "teacher_params" in metadata:
            names += ["teacher_params", "teacher_batch_stats"]
        for name in names:
            problem = _first_mismatch(getattr(state, name), metadata.get(name, {}), name)
            if problem:
                raise ValueError(f"config.init.init_from={path!r} (step {step}): {problem}")
        target = abstract_on_mesh({name: metadata[name] for name in names}, mesh)
        # A partial restore: only the variables are read from the stage-1 state.
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=jax.tree.map(_restore_args, target),
                    partial_restore=True,
                )
            ),
        ).state
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
    """Turns SIGTERM into a flag the train loop polls, so it can save and exit cleanly.

    On several processes the local flag alone would desynchronise the hosts, so there the
    Orbax/JAX preemption sync point (`manager.reached_preemption`) decides instead; JAX's
    distributed runtime catches SIGTERM itself in that case.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Callable[..., Any] | int | None = None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        logging.warning("Received signal %d: saving a checkpoint and exiting.", signum)
        self.requested = True

    def __enter__(self) -> PreemptionWatcher:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

    def should_stop(self, manager: ocp.CheckpointManager, step: int) -> bool:
        """True when this step must be saved and the run must stop."""
        if jax.process_count() > 1:
            return manager.reached_preemption(step)
        return self.requested
