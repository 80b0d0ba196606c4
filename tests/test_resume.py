"""Exact, crash-safe resume and the preflight (issue 3).  Tiny runs: 16 images, batch 4 -> 4 steps an epoch."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.forkserver import ForkServer
from tests.helpers import TINY, load, run_train, training_state_differences

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH, TOTAL_STEPS = 4, 12


def _exp(cwd: Path) -> Path:
    return cwd / "runs" / "fuse" / "exp"


def _assert_matches_reference(reference_run, run: Path):
    ref = load(reference_run[0] / "weights" / "last.pt")
    got = load(run / "weights" / "last.pt")
    assert training_state_differences(ref, got) == []
    assert (run / "results.csv").read_text() == (reference_run[0] / "results.csv").read_text()


@pytest.mark.parametrize("stop_after", [STEPS_PER_EPOCH, 6], ids=["epoch-boundary", "mid-epoch"])
def test_interrupted_and_resumed_run_is_bitwise_identical(reference_run, tiny_data, tmp_path, stop_after):
    first = run_train(
        ["--data", str(tiny_data), *TINY, "--save-period", "2"],
        tmp_path,
        env={"FUSE_TRAIN_STOP_AFTER_STEP": str(stop_after)},
    )
    assert first.returncode == 130, first.stderr
    assert "resume with: fuse-train --resume" in first.stderr
    ckpt = load(_exp(tmp_path) / "weights" / "last.pt")
    assert ckpt["progress"]["global_step"] == stop_after
    second = run_train(["--resume"], tmp_path)  # finds the newest last.pt under runs/fuse
    assert second.returncode == 0, second.stderr
    assert f"resuming mid fusion (n) at epoch {stop_after // STEPS_PER_EPOCH + 1}" in second.stdout
    rows = ckpt["results"]  # what the resumed run remembers, said on the line after (story 1: "the best mAP")
    if rows:
        best = max(rows, key=lambda r: r["fitness"])
        said = f"best so far: epoch {best['epoch']}, mAP50 {best['metrics/mAP50']:.3f}, mAP50-95"
        assert said in second.stdout.splitlines()[1], second.stdout
    else:
        assert "best so far" not in second.stdout
    _assert_matches_reference(reference_run, _exp(tmp_path))
    from ckpttools.commands.diff import diff_checkpoints  # what a user would run to check the resume

    assert (
        diff_checkpoints(reference_run[0] / "weights" / "last.pt", _exp(tmp_path) / "weights" / "last.pt").verdict
        == "identical"
    )
    history = load(_exp(tmp_path) / "weights" / "last.pt")["history"]
    assert [h["event"] for h in history] == ["start", "resume"] and history[1]["step"] == stop_after


def _start(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuse_train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first_line = proc.stdout.readline()  # printed once the signal handlers are installed and training starts
    assert first_line.startswith(("training", "resuming")), first_line + proc.stderr.read()
    return proc


def test_sigint_at_a_random_step_saves_and_resumes_exactly(reference_run, tiny_data, tmp_path):
    rng = random.Random(os.environ.get("PYTEST_SEED", "sigint"))
    for attempt in range(5):
        cwd = tmp_path / f"try{attempt}"
        cwd.mkdir()
        proc = _start(["--data", str(tiny_data), *TINY, "--save-period", "2"], cwd)
        time.sleep(rng.uniform(0.3, 2.5))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 0:  # finished before the signal; try an earlier moment
            continue
        assert proc.returncode == 130, err
        assert "SIGINT received" in out and "resume with:" in err
        step = load(_exp(cwd) / "weights" / "last.pt")["progress"]["global_step"]
        assert 0 < step < TOTAL_STEPS
        resumed = run_train(["--resume", str(_exp(cwd) / "weights" / "last.pt")], cwd)
        assert resumed.returncode == 0, resumed.stderr
        _assert_matches_reference(reference_run, _exp(cwd))
        return
    pytest.fail("the run always finished before SIGINT arrived")


def test_kill_9_at_random_moments_including_saves(reference_run, tiny_data, tmp_path):
    """--save-every 1 makes saves a large share of the run, so many kills land inside one."""
    rng = random.Random(os.environ.get("PYTEST_SEED", "kill9"))
    args = ["--data", str(tiny_data), *TINY, "--save-period", "2", "--save-every", "1"]
    last = _exp(tmp_path) / "weights" / "last.pt"
    kills = 0
    with ForkServer() as server:  # each run a process of its own, the imports paid once (tests/forkserver.py)
        for _ in range(12):
            if last.exists() and load(last)["progress"]["finished"]:
                break  # a kill that came after the final save: the run is whole, a resume would be refused
            proc = server.start(["--resume", str(last)] if last.exists() else args, tmp_path)
            assert proc.wait_for(" fusion"), proc.stderr  # "training mid fusion ..." / "resuming mid fusion ..."
            time.sleep(rng.uniform(0.05, 1.5))
            proc.kill()  # SIGKILL: no handler runs
            if proc.finish() == 0:
                break
            kills += 1
            if last.exists():  # whatever moment the kill hit, last.pt is whole and loads
                load(last)
            if kills >= 4:
                break
        assert kills >= 1
        if not last.exists() or not load(last)["progress"]["finished"]:  # every kill may precede the first save
            final = server.run(["--resume", str(last)] if last.exists() else args, tmp_path)
            assert final.returncode == 0, final.stderr
    assert not list(last.parent.glob(".*.tmp")), "stale temporary files left behind"
    _assert_matches_reference(reference_run, _exp(tmp_path))


@pytest.fixture(scope="module")
def stopped_run(tiny_data, tmp_path_factory):
    """A run stopped after step 2 of 12, to resume with changed options."""
    cwd = tmp_path_factory.mktemp("stopped")
    proc = run_train(["--data", str(tiny_data), *TINY], cwd, env={"FUSE_TRAIN_STOP_AFTER_STEP": "2"})
    assert proc.returncode == 130, proc.stderr
    return _exp(cwd) / "weights" / "last.pt"


def _snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--batch", "8"], "batch"),
        (["--lr0", "0.01"], "lr0"),
        (["--lrf", "0.1"], "lrf"),
        (["--momentum", "0.9"], "momentum"),
        (["--weight-decay", "0.001"], "weight-decay"),
        (["--optimizer", "SGD"], "optimizer"),
        (["--warmup-epochs", "2"], "warmup-epochs"),
        (["--fusion", "early"], "fusion"),
        (["--scale", "s"], "scale"),
        (["--img-size", "96"], "img-size"),
        (["--epochs", "5"], "epochs"),
    ],
)
def test_preflight_blocks_a_changed_field_before_writing_anything(stopped_run, extra, field):
    run = stopped_run.parent.parent
    before = _snapshot(run)
    proc = run_train(["--resume", str(stopped_run), *extra], run.parent)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert field in proc.stderr and f"--allow-change {field}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(run) == before


def test_allowed_change_is_recorded_in_history(stopped_run, tmp_path):
    run = tmp_path / "exp"
    shutil.copytree(stopped_run.parent.parent, run)
    proc = run_train(
        ["--resume", str(run / "weights" / "last.pt"), "--lr0", "0.003", "--allow-change", "lr0"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    ckpt = load(run / "weights" / "last.pt")
    assert ckpt["train_args"]["lr0"] == 0.003
    resume = ckpt["history"][-1]
    assert resume["event"] == "resume" and resume["step"] == 2
    assert resume["changes"] == [{"field": "lr0", "from": "0.002", "to": "0.003"}]
    # --no-plots is the run's (TINY) and carries over to the resume: results.csv without results.png
    assert (run / "results.csv").exists() and not list(run.glob("*.png"))


def test_changed_dataset_content_blocks_and_moved_dataset_passes(stopped_run, tiny_data, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_data.parent, moved)
    spec = yaml.safe_load((moved / "data.yaml").read_text())
    spec["path"] = str(moved)
    (moved / "data.yaml").write_text(yaml.safe_dump(spec))
    run = tmp_path / "exp"
    shutil.copytree(stopped_run.parent.parent, run)
    last = str(run / "weights" / "last.pt")
    # a label edited at the new place: blocked, named as changed content
    label = moved / "labels" / "train" / "00000.txt"
    original = label.read_text()
    label.write_text(original + "0 0.5 0.5 0.1 0.1\n")
    proc = run_train(["--resume", last, "--data", str(moved / "data.yaml")], tmp_path)
    assert proc.returncode == 3 and "data" in proc.stderr and "different dataset" in proc.stderr
    # identical content at the new place: a note, and the resume proceeds
    label.write_text(original)
    proc = run_train(["--resume", last, "--data", str(moved / "data.yaml"), "--epochs", "3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "moved, identical content" in proc.stdout


def test_finished_run_refuses_and_can_be_extended(reference_run, tmp_path):
    run = tmp_path / "exp"
    shutil.copytree(reference_run[0], run)
    last = str(run / "weights" / "last.pt")
    proc = run_train(["--resume", last], tmp_path)
    assert proc.returncode == 2
    assert "finished all 3 epochs" in proc.stderr and "--allow-change epochs" in proc.stderr
    proc = run_train(["--resume", last, "--epochs", "4"], tmp_path)
    assert proc.returncode == 3  # a larger --epochs still needs the explicit allow flag
    proc = run_train(["--resume", last, "--epochs", "4", "--allow-change", "epochs"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = (run / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_resume_without_checkpoint_is_one_clear_line(tmp_path):
    proc = run_train(["--resume", "--project", str(tmp_path / "none")], tmp_path)
    assert proc.returncode == 2 and "no run with weights/last.pt" in proc.stderr
    bad = tmp_path / "exp" / "weights" / "last.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 truncated")
    proc = run_train(["--resume", str(bad)], tmp_path)
    assert proc.returncode == 2 and "damaged" in proc.stderr and "ckpt repair" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_second_ctrl_c_exits_at_once_and_last_pt_still_loads(tiny_data, tmp_path):
    """Two SIGINTs in a row (the second during the save the first one asked for): no torn last.pt."""
    proc = _start(["--data", str(tiny_data), *TINY, "--save-every", "1"], tmp_path)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = _exp(tmp_path) / "weights" / "last.pt"
    if (
        last.exists()
    ):  # the second signal may land before the first save finished: then no last.pt yet, never a torn one
        assert load(last)["progress"]["global_step"] >= 1
