"""The errors a run reports to its user, on the bottom floor so that any module may raise
them and `cli_errors` can catch them by type. Nothing here imports JAX."""

from __future__ import annotations

import errno
import signal
import sys


class Interrupted(Exception):
    """The run stopped on a signal after saving the checkpoint of `step`."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum = signum
        self.step = step


class SignalRecorder:
    """The SIGINT and SIGTERM handler of a command from its start: records the signal, then
    raises KeyboardInterrupt as Python's own SIGINT handler does, so that a SIGTERM before
    the train loop also unwinds (the workdir lock is released) instead of killing the
    process where it stands. Python discards a KeyboardInterrupt
    raised inside a garbage-collector callback (or a `__del__`), so `received` keeps the
    Ctrl-C for whoever looks next: the train loop's watcher when it takes over, and the
    entry point when the command ends. `discard_unraisable`, as `sys.unraisablehook`,
    keeps that discard off stderr (Python prints it with a traceback)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._other_unraisable_hook = sys.unraisablehook

    def __call__(self, signum: int, frame: object) -> None:
        del frame
        self.received = signum
        raise KeyboardInterrupt

    def discard_unraisable(self, unraisable: sys.UnraisableHookArgs) -> None:
        """Drops the KeyboardInterrupt of a recorded signal; passes anything else to the
        hook that was in place when the recorder was made."""
        if unraisable.exc_type is KeyboardInterrupt and self.received is not None:
            return
        self._other_unraisable_hook(unraisable)


class CheckpointWriteError(ValueError):
    """The checkpoint directory cannot be written; the run must stop at once."""


class DamagedDatasetError(ValueError):
    """A prepared dataset's files cannot be read (truncated, garbage); the message names
    the file and how to prepare the dataset again."""


_MACHINE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE, errno.ENOMEM})
# How TensorStore, ArrayRecord and XLA name the same faults in their own errors' messages.
_MACHINE_MARKERS = (
    "PERMISSION_DENIED",
    "Permission denied",
    "RESOURCE_EXHAUSTED",
    "Out of memory",
    "Input/output error",
    "Stale file handle",
)


def is_machine_fault(error: BaseException) -> bool:
    """True when a read failed for the machine's sake (no permission, an I/O error, no
    memory), not for the bytes read: the file (a checkpoint, a record) is not damaged."""
    seen: BaseException | None = error
    for _ in range(16):  # The chain of causes, bounded.
        if seen is None:
            return False
        if isinstance(seen, MemoryError):
            return True
        if isinstance(seen, OSError) and seen.errno in _MACHINE_ERRNOS:
            return True
        if any(marker in str(seen) for marker in _MACHINE_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
