"""Async saves: a kill while the background writer works leaves a loadable last.pt, and the resumed run is
still the uninterrupted one, bitwise."""

from __future__ import annotations

import random
import time

import pytest

from ckpttools.commands.verify import verify
from tests.forkserver import ForkServer
from tests.helpers import TINY, load, run_train, training_state_differences

pytestmark = pytest.mark.slow  # end-to-end training runs


def test_ten_kills_during_background_writes(reference_run, tiny_data, tmp_path):
    with ForkServer() as server:  # each run a process of its own, the imports paid once (tests/forkserver.py)
        _ten_kills(server, reference_run, tiny_data, tmp_path)


def _ten_kills(server: ForkServer, reference_run, tiny_data, tmp_path) -> None:
    rng = random.Random(3)
    last = tmp_path / "runs" / "fuse" / "exp" / "weights" / "last.pt"
    kills = 0
    for _ in range(10):
        point = rng.choice(["before-fsync", "before-rename", "after-rename", "keep-previous"])
        fault = f"{point}@{rng.randint(1, 4)}:checkpoint-writer"  # only on the background writer's thread
        args = ["--resume", str(last)] if last.exists() else ["--data", str(tiny_data), *TINY, "--save-every", "1"]
        proc = server.run(args, tmp_path, env={"CKPTTOOLS_FAULT": fault})
        if proc.returncode == 0:
            break
        assert proc.returncode == -9, proc.stderr
        kills += 1
        if last.exists():
            assert not verify(last).errors, f"kill {kills} ({fault}) left a damaged last.pt"
            load(last)  # and plain torch.load reads it
    assert kills >= 5
    while not load(last)["progress"].get("finished"):
        proc = server.run(["--resume", str(last)], tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert training_state_differences(load(reference_run[0] / "weights" / "last.pt"), load(last)) == []


def test_sync_and_async_saves_write_the_same_run(reference_run, tiny_data, tmp_path):
    proc = run_train(["--data", str(tiny_data), *TINY, "--no-async-save"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    sync = load(tmp_path / "runs" / "fuse" / "exp" / "weights" / "last.pt")
    assert training_state_differences(load(reference_run[0] / "weights" / "last.pt"), sync) == []


def test_kills_during_dcp_async_saves(reference_run, tiny_data, tmp_path):
    """--save-format dcp: dcp.async_save writes a staging folder that is swapped in whole.  Kills at the swap
    points (deterministic) and at random moments while a save is written every step: last.dcp is always a
    folder that verifies, no staging folder survives the next start, and the finished run is the
    uninterrupted one."""
    from fuse_train.checkpoint.reading import load_folder

    rng = random.Random(5)
    weights = tmp_path / "runs" / "fuse" / "exp" / "weights"
    last = weights / "last.dcp"
    fresh = ["--data", str(tiny_data), *TINY, "--save-every", "1", "--save-format", "dcp"]
    with ForkServer() as server:  # each run a process of its own, the imports paid once (tests/forkserver.py)
        for attempt in range(6):  # each DCP save of this model takes about a second (1,890 items): six, not ten
            if last.exists() and load_folder(last)["progress"].get("finished"):
                break  # a kill that came after the last save: the run is whole, a resume would be refused
            args = ["--resume", str(last)] if last.exists() else fresh
            if attempt % 2 == 0:  # at a swap: before it, after it, or while the replaced folder is kept
                point = rng.choice(["folder-before-swap", "folder-after-swap", "keep-previous"])
                proc = server.start(args, tmp_path, env={"CKPTTOOLS_FAULT": f"{point}@{rng.randint(1, 3)}"})
            else:  # anywhere once training runs: mostly inside DCP's own writes (a save every step)
                proc = server.start(args, tmp_path)
                proc.wait_for(" fusion")  # "training mid fusion ..." / "resuming mid fusion ..."
                time.sleep(rng.uniform(0.0, 2.0))
                proc.kill()
            assert proc.finish() in (-9, 0), proc.stderr
            if last.exists():
                assert not verify(last).errors, f"kill {attempt} left a damaged last.dcp"
                load_folder(last)
        while not (last.exists() and load_folder(last)["progress"].get("finished")):
            proc = server.run(["--resume", str(last)] if last.exists() else fresh, tmp_path)
            assert proc.returncode == 0, proc.stderr
    assert not [p.name for p in weights.iterdir() if p.name.endswith(".tmp")]  # the next start removed them
    assert training_state_differences(load(reference_run[0] / "weights" / "last.pt"), load_folder(last)) == []
