"""Faults of reading checkpoints: another run's, unreadable steps, another model's, noise.

`Manager` is Orbax's manager, except that a step whose metrics file cannot be read
(garbage, empty) counts as a step without metrics, with one warning naming the file,
and is kept (`KeepUnreadableMetrics`: it may be the best), rather than an error that
stops every resume, eval and predict (Orbax reads all the steps' metrics on opening).

`check_same_run` compares the settings that define a run (`IDENTITY`: stage, weak label,
datasets, model architecture) with those saved beside each checkpoint of a workdir,
before anything there is written or rotated: resuming a stage-1 workdir with a stage-2
config would otherwise train on from the stage-1 step and rotate its checkpoints away.

`newest_readable` tries the steps of a manager from the newest and skips (with one
warning each) the ones that cannot be read, moving them to `checkpoints/corrupt/STEP`
when asked, so that the run writes that step again. A checkpoint of another model
(`check_same_model`: the first leaf whose shape differs, compared as flattened
`flax.traverse_util` trees) is a DifferentModelError and is left alone. A failed Orbax
restore leaves reads running in background threads whose tracebacks would flood the
terminal; `quiet_failed_restore` filters exactly those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as std_logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from wsda_jax import config_lib, errors

CORRUPT_DIR = "corrupt"
# The settings that make a run what it is (a key names a value or a whole subtree): a
# checkpoint saved under other values belongs to another run.
IDENTITY = ("stage", "weak_label", "data.source", "data.target", "model")
# What evaluating or predicting with a checkpoint needs to match: the model, and the stage
# (which models an evaluation reports); evaluating on another dataset is allowed.
INFERENCE_IDENTITY = ("stage", "model")
NOT_IDENTITY = ("model.remat", "model.mit_unroll")  # How the model is computed, not what.


class DifferentModelError(ValueError):
    """A checkpoint whose state does not fit this config's model (not a corrupt file)."""


def _stored_shape(leaf: Any) -> tuple[int, ...]:
    """The shape Orbax stores: a typed PRNG key is saved as its key data."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/backbone/conv1/kernel': shape} of a state, a subtree or Orbax metadata."""
    flat = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(tree), sep="/")
    # None is an empty subtree to JAX (optax's masked states), never a stored array.
    return {name: _stored_shape(leaf) for name, leaf in flat.items() if leaf is not None}


def shape_problem(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
) -> str | None:
    """The first difference between two {leaf: shape} tables, in words."""
    for name, shape in expected.items():
        if name not in found:
            return f"{name} is missing from the checkpoint"
        if found[name] != shape:
            return f"{name} has shape {found[name]}, this config {shape}"
    return None


def check_same_model(step: int, abstract_state: Any, metadata: Any) -> None:
    """Raises DifferentModelError naming the first leaf whose shape differs (or that
    only one side has) between this config's state and checkpoint `step`'s metadata."""
    found = leaf_shapes(getattr(metadata, "tree", metadata))
    expected = leaf_shapes(abstract_state)
    extra = sorted(set(found) - set(expected))
    problem = shape_problem(expected, found) or (
        f"{extra[0]} is in the checkpoint but not in this config" if extra else None
    )
    if problem:
        raise DifferentModelError(f"checkpoint {step} was written by a different model: {problem}")


def restore_target(abstract_state: Any, metadata: Any) -> tuple[Any, list[str]]:
    """(what to restore, the absent fields): the state's fields without leaves that
    checkpoint `metadata` lacks (`TrainState.imnet_encoder` {} of checkpoints written
    before it existed) are left out and keep their value; the rest is restored."""
    on_disk = getattr(metadata, "tree", metadata)
    fields = dataclasses.fields(abstract_state) if dataclasses.is_dataclass(abstract_state) else ()
    absent = [
        f.name
        for f in fields
        if f.name not in on_disk and not jax.tree.leaves(getattr(abstract_state, f.name))
    ]
    if not absent:
        return abstract_state, absent
    return {f.name: getattr(abstract_state, f.name) for f in fields if f.name not in absent}, absent


def first_mismatch(expected: Any, found: Any, prefix: str) -> str | None:
    """Names the first leaf of `expected` that is missing or has another shape in `found`."""
    return shape_problem(
        {f"{prefix}/{name}": shape for name, shape in leaf_shapes(expected).items()},
        {f"{prefix}/{name}": shape for name, shape in leaf_shapes(found).items()},
    )


def _metrics_path(directory: str, step: int) -> str:
    return os.path.join(directory, str(step), "metrics", "metrics")


def _unreadable_metrics(directory: str, step: int) -> bool:
    """Whether step `step` has a metrics file that is not a JSON object."""
    try:
        with open(_metrics_path(directory, step), "rb") as f:
            return not isinstance(json.loads(f.read()), dict)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True


class Manager(ocp.CheckpointManager):
    """Orbax's manager, except that a step whose metrics file cannot be read counts as a
    step without metrics (one warning naming the file) instead of an error that stops
    every resume, eval and predict of the folder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.unreadable_metrics: set[int] = set()  # Warned about once; Orbax reads them often.
        super().__init__(*args, **kwargs)

    def _get_metrics(self, step: int) -> Any:
        try:
            return super()._get_metrics(step)
        except (OSError, ValueError) as error:
            if step in self.unreadable_metrics:
                return None
            self.unreadable_metrics.add(step)
            logging.warning(
                "Unreadable metrics %s (%s): checkpoint %d is kept, but not ranked by mIoU.",
                _metrics_path(str(self.directory), step),
                f"{type(error).__name__}: {error}"[:200],
                step,
            )
            return None


@dataclasses.dataclass
class KeepUnreadableMetrics(checkpoint_managers.PreservationPolicy):
    """Keeps the steps whose metrics file cannot be read: one of them may be the best."""

    directory: str

    def should_preserve(self, checkpoints: Any, *, context: Any) -> list[bool]:
        del context
        return [_unreadable_metrics(self.directory, info.step) for info in checkpoints]


def _identity(config: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """{'model.depth': 18, 'stage': 'adapt', ...}: the `keys` (IDENTITY) of a config as
    JSON values (tuples as lists, as the saved configs hold them)."""
    flat = flax.traverse_util.flatten_dict(dict(config), sep=".")
    return {
        key: value
        for key, value in flat.items()
        if any(key == k or key.startswith(k + ".") for k in keys) and key not in NOT_IDENTITY
    }


def saved_run_configs(directory: str) -> dict[int, dict[str, Any]]:
    """{step: the config saved with it} for the readable configs of the checkpoints in
    `directory` (an unreadable one is left to `newest_readable`); read directly, without
    a manager, so that nothing in the folder is touched."""
    configs = {}
    steps = [name for name in os.listdir(directory) if name.isdigit()]
    for step in sorted(steps, key=int):
        try:
            config = ocp.JsonCheckpointHandler().restore(epath.Path(directory) / step / "config")
        except (OSError, ValueError):
            continue
        if isinstance(config, dict):
            configs[int(step)] = dict(config)
    return configs


def run_difference(
    config: Any, saved: Mapping[str, Any], keys: tuple[str, ...] = IDENTITY
) -> dict[str, tuple[Any, Any]]:
    """{key: (this config's value, the saved one)} of the IDENTITY keys that differ. A key
    that the saved config lacks (written before the key existed) counts as its default
    in `config_lib.base_config()`; a key without a default there is not compared."""
    ours = _identity(json.loads(config.to_json()), keys)
    theirs = _identity(saved, keys)
    defaults = _identity(json.loads(config_lib.base_config().to_json()), keys)
    differences = {}
    for key, value in ours.items():
        if key in theirs:
            if theirs[key] != value:
                differences[key] = (value, theirs[key])
        elif key in defaults and defaults[key] != value:
            differences[key] = (value, defaults[key])
    return differences


def check_same_run(
    config: Any, workdir: str, directory: str, keys: tuple[str, ...] = IDENTITY
) -> None:
    """Raises a one-line ValueError when a checkpoint in `directory` (of `workdir`) was
    saved by a run whose IDENTITY settings differ from `config`'s, naming the difference
    and what was likely meant; nothing is read beyond the saved configs."""
    if not os.path.isdir(directory):
        return
    for step, saved in sorted(saved_run_configs(directory).items(), reverse=True):
        differences = run_difference(config, saved, keys)
        if not differences:
            continue
        ours = ", ".join(f"{key}={value[0]!r}" for key, value in differences.items())
        theirs = ", ".join(f"{key}={value[1]!r}" for key, value in differences.items())
        if saved.get("stage") in ("source_only", "oracle") and config.stage == "adapt":
            intent = (
                f"to start stage 2 from it, use a new --workdir with "
                f"--config.init.init_from={workdir}"
            )
        else:
            intent = "to continue it, use its config; for this config, use another --workdir"
        raise ValueError(
            f"--workdir={workdir} holds another run: its checkpoint {step} was saved with "
            f"{theirs}, this config has {ours}; nothing was changed ({intent})"
        )


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
            with quiet_failed_restore():
                return restore(step), step
        except DifferentModelError:
            raise
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back.
            if errors.is_machine_fault(error):  # The checkpoint may read fine next time.
                raise ValueError(
                    f"checkpoint {manager.directory}/{step} cannot be read now "
                    f"({type(error).__name__}: {_first_line(error)}); nothing was moved or "
                    "changed: fix that and run the same command again"
                ) from error
            _report_unreadable(manager, step, error, set_aside=set_aside)
    if steps:
        moved = f", moved to {manager.directory}/{CORRUPT_DIR}" if set_aside else ""
        raise ValueError(
            f"no readable checkpoint in {manager.directory} (tried steps {steps}{moved})"
        )
    return None


def check_nothing_set_aside(directory: str) -> None:
    """Raises a one-line ValueError when a run that found no readable checkpoint in
    `directory` has earlier ones set aside in `corrupt/`: starting over would overwrite
    its metrics, and the user may be able to read them again (a disk remounted)."""
    corrupt = os.path.join(directory, CORRUPT_DIR)
    steps = sorted(os.listdir(corrupt)) if os.path.isdir(corrupt) else []
    if steps:
        raise ValueError(
            f"no readable checkpoint in {directory}, and its unreadable ones are in "
            f"{corrupt} (steps {', '.join(steps)}): starting over would overwrite this run's "
            f"metrics; move a readable one back, or delete {corrupt} to start over"
        )


def _report_unreadable(
    manager: ocp.CheckpointManager, step: int, error: Exception, *, set_aside: bool
) -> None:
    """One warning line; the step's folder moves to corrupt/ when `set_aside`."""
    path = os.path.join(str(manager.directory), str(step))
    reason = f"{type(error).__name__}: {_first_line(error)}"
    if set_aside:
        try:
            moved = _set_aside(str(manager.directory), step) if jax.process_index() == 0 else ""
        except OSError as move_error:
            raise ValueError(
                f"checkpoint {path} is unreadable ({reason}) and cannot be moved to "
                f"{CORRUPT_DIR}/: {move_error.strerror}: {move_error.filename} (make "
                f"{manager.directory} writable, or move {path} away yourself)"
            ) from move_error
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


def quiet_background_writes() -> None:
    """Filters the same noise for the rest of the process: an asynchronous save that
    fails (a full disk) leaves writes whose loop has closed after `save` returned."""
    _RESTORE_NOISE.install()
    _RESTORE_NOISE.keep = True


@contextlib.contextmanager
def quiet_failed_restore():
    """Around one restore (or save). When it fails, Orbax leaves reads running in background
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
