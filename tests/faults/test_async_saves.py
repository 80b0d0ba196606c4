"""Async saves: a kill while the background writer works leaves a loadable last.pt, and the resumed run is
still the uninterrupted one, bitwise."""

from __future__ import annotations

import random

import pytest

from ckpttools.commands.verify import verify
from tests.helpers import TINY, load, run_train, training_state_differences

pytestmark = pytest.mark.slow  # end-to-end training runs


def test_ten_kills_during_background_writes(reference_run, tiny_data, tmp_path):
    rng = random.Random(3)
    last = tmp_path / "runs" / "fuse" / "exp" / "weights" / "last.pt"
    kills = 0
    for attempt in range(10):
        point = rng.choice(["before-fsync", "before-rename", "after-rename", "keep-previous"])
        fault = f"{point}@{rng.randint(1, 4)}:checkpoint-writer"  # only on the background writer's thread
        args = ["--resume", str(last)] if last.exists() else ["--data", str(tiny_data), *TINY, "--save-every", "1"]
        proc = run_train(args, tmp_path, env={"CKPTTOOLS_FAULT": fault})
        if proc.returncode == 0:
            break
        assert proc.returncode == -9, proc.stderr
        kills += 1
        if last.exists():
            assert not verify(last).errors, f"kill {kills} ({fault}) left a damaged last.pt"
            load(last)  # and plain torch.load reads it
    assert kills >= 5
    while not load(last)["progress"].get("finished"):
        proc = run_train(["--resume", str(last)], tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert training_state_differences(load(reference_run[0] / "weights" / "last.pt"), load(last)) == []


def test_sync_and_async_saves_write_the_same_run(reference_run, tiny_data, tmp_path):
    proc = run_train(["--data", str(tiny_data), *TINY, "--no-async-save"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    sync = load(tmp_path / "runs" / "fuse" / "exp" / "weights" / "last.pt")
    assert training_state_differences(load(reference_run[0] / "weights" / "last.pt"), sync) == []
