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


class CheckpointWriteError(ValueError):
    """The checkpoint directory cannot be written; the run must stop at once."""
