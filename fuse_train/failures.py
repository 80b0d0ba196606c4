"""How work ends early: a run that cannot go on, an interrupt after a resumable save, an unusable checkpoint or
source for val / predict / export.  No torch here: the command-line modules catch these before torch loads."""

from __future__ import annotations

import signal
from pathlib import Path


class TrainingFailed(Exception):
    """The run cannot go on (non-finite loss, a full disk); the message says why and what is kept."""


class TrainingInterrupted(Exception):
    """Raised after a signal was handled and a resumable checkpoint was saved."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.checkpoint = signum, checkpoint


class InferenceError(ValueError):
    """A checkpoint or source that cannot be used; the message names it."""
