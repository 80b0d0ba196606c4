"""Progress in a log file (issue 26): one line per --log-interval seconds with step, losses, speed and ETA,
whatever the epoch's length; none on a terminal (the bar shows it) or with --log-interval 0."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuse_train.training import progress as T


def _fake(interval: float, steps_done: int = 0):
    lines: list[str] = []
    return SimpleNamespace(
        dist=SimpleNamespace(is_main=True),
        console=None,
        epoch=0,
        step_in_epoch=steps_done,
        log_interval=interval,
        cfg=SimpleNamespace(epochs=3, batch=8),
        log=lines.append,
    ), lines


@settings(max_examples=60, deadline=None)
@given(
    steps=st.integers(2, 400),
    step_seconds=st.floats(0.01, 20),
    interval=st.floats(0.5, 60),
)
def test_one_line_per_interval_for_any_epoch_length_and_speed(steps, step_seconds, interval):
    clock = [1000.0]
    trainer, lines = _fake(interval)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(T.time, "monotonic", lambda: clock[0])
        progress = T.EpochProgress(trainer, steps)
        for done in range(1, steps + 1):
            clock[0] += step_seconds
            trainer.step_in_epoch = done
            progress.update(torch.tensor([0.5, 1.5]), 1e-3, clock[0] - 1000.0)
    total = steps * step_seconds
    # a line when an interval has passed since the last one, never at the epoch's end (its summary line says it)
    assert len(lines) <= total // interval + 1
    if (steps - 1) * step_seconds >= interval * 1.001 + 1e-6:
        assert lines, "an epoch longer than the interval printed nothing"
    for line in lines:
        assert f"/{steps} " in line and "img/s" in line and "epoch ETA" in line and "box 0.5000" in line
        assert len(line) <= 120


def test_the_eta_and_speed_are_what_the_steps_took(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(T.time, "monotonic", lambda: clock[0])
    trainer, lines = _fake(30)
    progress = T.EpochProgress(trainer, 100)
    for done in range(1, 101):
        clock[0] += 2.0  # 2 s a step, batch 8: 4 img/s; 15 steps pass per 30 s line
        trainer.step_in_epoch = done
        progress.update(torch.tensor([0.5, 1.5]), 1e-3, clock[0])
    assert len(lines) == 6  # at 30, 60, ..., 180 s (the 7th would be at step 105)
    assert "step 15/100" in lines[0] and "4.0 img/s" in lines[0] and "epoch ETA 0:02:50" in lines[0]


@pytest.mark.parametrize("interval", [0.0])
def test_interval_zero_prints_nothing(monkeypatch, interval):
    clock = [0.0]
    monkeypatch.setattr(T.time, "monotonic", lambda: clock[0])
    trainer, lines = _fake(interval)
    progress = T.EpochProgress(trainer, 50)
    for done in range(1, 51):
        clock[0] += 100
        trainer.step_in_epoch = done
        progress.update(torch.tensor([0.5, 1.5]), 1e-3, clock[0])
    assert lines == []
