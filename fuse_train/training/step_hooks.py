"""Environment-variable hooks that let tests and benches stop a run at an exact step, the way a user would.

``FUSE_TRAIN_STOP_AFTER_STEP=N``: behave as if Ctrl-C arrived during optimizer step N.
``FUSE_TRAIN_SIGNAL_AFTER_STEP=TERM:N`` (or ``KILL:N``, ``USR1:N``): a real signal to this process after step N;
SIGTERM goes through the handler like an outside one, SIGKILL dies wherever the run is (events written, not
yet saved, ...).  Unset, they do nothing; they are read once, when the trainer is built.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class StepHooks:
    stop_after: int | None = None
    signal_after: tuple[int, int] | None = None  # (signal number, step)

    @classmethod
    def from_env(cls) -> StepHooks:
        stop_at = os.environ.get("FUSE_TRAIN_STOP_AFTER_STEP")
        signal_at = os.environ.get("FUSE_TRAIN_SIGNAL_AFTER_STEP", "")
        name, _, step = signal_at.partition(":")
        return cls(
            int(stop_at) if stop_at else None,
            (getattr(signal, "SIG" + name), int(step)) if signal_at else None,
        )

    def after_step(self, global_step: int, signals) -> None:
        """Run after optimizer step ``global_step``; ``signals`` is the trainer's ``SignalState``."""
        if self.stop_after == global_step:
            signals.stop = signal.SIGINT
        if self.signal_after and self.signal_after[1] == global_step:
            os.kill(os.getpid(), self.signal_after[0])
