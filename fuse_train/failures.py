"""How a run ends before its last epoch: a failure it cannot go on from, or an interrupt after a resumable save."""

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
