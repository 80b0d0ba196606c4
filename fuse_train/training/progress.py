"""What a person sees inside an epoch: a rich bar on a terminal, a plain line per --log-interval in a log file."""

from __future__ import annotations

import time

import torch


class EpochProgress:
    """A rich progress bar on a terminal; otherwise (a log file) one plain line per ``log_interval`` seconds
    with the step, losses, speed and the epoch's ETA, as file loggers do."""

    def __init__(self, trainer, steps: int):
        self.trainer, self.steps = trainer, steps
        self.epoch = trainer.epoch
        self.bar = None
        console = trainer.console
        if trainer.dist.is_main and console is not None and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(f"epoch {self.epoch + 1}/{trainer.cfg.epochs}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.task = self.bar.add_task("train", total=steps, completed=trainer.step_in_epoch, info="")
            self.bar.start()
        self.first_step, self.started = trainer.step_in_epoch, time.monotonic()
        self.last_line = self.started

    def update(self, mean_losses: torch.Tensor, lr: float, elapsed: float) -> None:
        info = f"box {mean_losses[0]:.4f} cls {mean_losses[1]:.4f} lr {lr:.2e}"
        done = self.trainer.step_in_epoch
        if self.bar is not None:
            self.bar.update(self.task, completed=done, info=info)
            return
        now, interval = time.monotonic(), self.trainer.log_interval
        if not self.trainer.dist.is_main or interval <= 0 or now - self.last_line < interval or done >= self.steps:
            return
        self.last_line = now
        rate = (done - self.first_step) / max(now - self.started, 1e-9)  # steps per second since this epoch began
        eta = (self.steps - done) / rate if rate > 0 else float("nan")
        self.trainer.log(
            f"  epoch {self.epoch + 1}/{self.trainer.cfg.epochs} step {done}/{self.steps}  {info}  "
            f"{rate * self.trainer.cfg.batch:.1f} img/s  epoch ETA {_clock(eta)}  ({elapsed:.0f}s)"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no speed measured yet
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
