"""The errors a run reports to its user, on the bottom floor so that any module may raise
them and `cli_errors` can catch them by type. Nothing here imports JAX."""

from __future__ import annotations

import signal


class Interrupted(Exception):
    """The run stopped on a signal after saving the checkpoint of `step`."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum = signum
        self.step = step


class SignalRecorder:
    """The SIGINT handler of a command from its start: records the signal, then raises
    KeyboardInterrupt as Python's own handler does. Python discards a KeyboardInterrupt
    raised inside a garbage-collector callback (or a `__del__`), so `received` keeps the
    Ctrl-C for whoever looks next: the train loop's watcher when it takes over, and the
    entry point when the command ends."""

    def __init__(self) -> None:
        self.received: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        del frame
        self.received = signum
        raise KeyboardInterrupt


class CheckpointWriteError(ValueError):
    """The checkpoint directory cannot be written; the run must stop at once."""


class DamagedDatasetError(ValueError):
    """A prepared dataset's files cannot be read (truncated, garbage); the message names
    the file and how to prepare the dataset again."""
