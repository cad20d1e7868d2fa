"""Faults of reading checkpoints: unreadable steps, another model's checkpoints, noise.

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

CORRUPT_DIR = "corrupt"


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


def first_mismatch(expected: Any, found: Any, prefix: str) -> str | None:
    """Names the first leaf of `expected` that is missing or has another shape in `found`."""
    return shape_problem(
        {f"{prefix}/{name}": shape for name, shape in leaf_shapes(expected).items()},
        {f"{prefix}/{name}": shape for name, shape in leaf_shapes(found).items()},
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
def quiet_failed_restore():
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
