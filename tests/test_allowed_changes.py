"""An allowed change keeps the run whole (issue 24): a resume with --batch N --allow-change batch continues a
run that every tool still reads: each later checkpoint verifies, the learning rate continues its curve by
epoch position (no second warmup, the planned end), the resume sits where it happened, and a further resume
works.  Plus the rule itself (fuse_train.training.state.continue_with) on generated positions."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from ckpttools.cli import main as CKPT
from ckpttools.report import Report
from ckpttools.trainers.fuse_train import check_counters
from fuse_train.training.state import LRSchedule, Segment, continue_with, schedule_step
from tests.helpers import TINY, load, run_train, tb_scalars


@given(
    n=st.integers(8, 500),
    old_batch=st.integers(1, 64),
    new_batch=st.integers(1, 64),
    data=st.data(),
)
def test_a_changed_batch_continues_at_the_same_samples_and_the_counters_stay_one_position(
    n, old_batch, new_batch, data
):
    old_spe, new_spe = max(1, n // old_batch), max(1, n // new_batch)
    epoch = data.draw(st.integers(0, 20))
    step_old = data.draw(st.integers(0, old_spe - 1))
    global_step = epoch * old_spe + step_old
    progress = {
        "epoch": epoch,
        "step_in_epoch": step_old,
        "global_step": global_step,
        "samples_seen": global_step * old_batch,
    }
    step, segment = continue_with(progress, old_batch, new_batch, new_spe)
    # never ahead of the data already taken, at most one new batch behind it
    assert step * new_batch <= step_old * old_batch < (step + 1) * new_batch or step == new_spe
    assert global_step == segment.global_step + (epoch - segment.epoch) * new_spe + step
    assert segment.samples_seen + step * new_batch == progress["samples_seen"]
    # and ckpt verify's check agrees, for this step and every later one of the segment
    for later in range(3):
        e, s = epoch + (step + later) // new_spe, (step + later) % new_spe
        g = global_step + later
        tree = {
            "epoch": e - 1,
            "progress": {
                "epoch": e,
                "step_in_epoch": s,
                "global_step": g,
                "steps_per_epoch": new_spe,
                "segment": segment.to_dict(),
            },
            "history": [{"event": "resume", "step": global_step, "changes": [{"field": "batch"}]}],
        }
        report = Report("x")
        check_counters(tree, report)
        assert not report.errors, (tree, report.findings)


def test_an_inconsistent_position_still_fails_and_a_segment_needs_a_recorded_change():
    progress = {"epoch": 2, "step_in_epoch": 1, "global_step": 10, "steps_per_epoch": 4}
    report = Report("x")
    check_counters({"epoch": 1, "progress": progress}, report)
    assert [f.code for f in report.errors] == ["counters.inconsistent"]  # 10 != 2 x 4 + 1
    moved = dict(progress, segment=Segment(1, 5, 40).to_dict())  # 5 + 1 x 4 + 1 = 10: consistent ...
    report = Report("x")
    check_counters({"epoch": 1, "progress": moved, "history": []}, report)
    assert "no allowed change" in report.errors[0].message  # ... but no resume with a change explains it


@pytest.mark.slow
def test_a_resume_with_another_batch_size_keeps_the_run_whole(tiny_data, tmp_path):
    run = tmp_path / "runs" / "fuse" / "exp"
    # batch 4: 4 steps an epoch; stopped in epoch 2 after its 2nd step (global step 6, 24 samples)
    stopped = run_train(["--data", str(tiny_data), *TINY], tmp_path, env={"FUSE_TRAIN_STOP_AFTER_STEP": "6"})
    assert stopped.returncode == 130, stopped.stderr
    before = tb_scalars(run)["lr/pg0"]
    resumed = run_train(
        ["--resume", str(run / "weights" / "last.pt"), "--batch", "8", "--allow-change", "batch"], tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    for path in sorted((run / "weights").glob("*.pt")):  # every later save verifies
        result = CliRunner().invoke(CKPT, ["verify", str(path)])
        assert result.exit_code == 0, (path.name, result.output)
    ckpt = load(run / "weights" / "last.pt")
    p = ckpt["progress"]
    # batch 8: 2 steps an epoch; it went on from the 16 samples of epoch 2 already taken (step 1 of 2)
    assert p["segment"] == {"epoch": 1, "global_step": 5, "samples_seen": 16} and p["global_step"] == 9
    assert p["samples_seen"] == 24 + 3 * 8 and p["epoch"] == 3  # 24 before, 1 + 2 steps of 8 after
    # the learning rate: no second warmup, and the last step is where the planned schedule ends
    lr = dict(tb_scalars(run)["lr/pg0"])
    first_after = lr[7]
    assert first_after <= before[-1][1] * (1 + 1e-9)
    args = ckpt["train_args"]
    schedule = LRSchedule(
        args["lr0"], args["lrf"], args["momentum"], round(args["warmup_epochs"] * 2), 3 * 2, args["schedule"]
    )
    assert lr[9] == pytest.approx(schedule.lr(schedule_step(2, 1, 2)), rel=1e-6)
    # the resume is drawn where it happened: after 1.5 epochs
    assert ckpt["history"][-1]["position"] == pytest.approx(1.5)
    # and the run goes on: extended by an epoch, every file still verifies
    shutil.copy(run / "weights" / "last.pt", tmp_path / "before-extend.pt")
    extended = run_train(
        ["--resume", str(run / "weights" / "last.pt"), "--epochs", "4", "--allow-change", "epochs"], tmp_path
    )
    assert extended.returncode == 0, extended.stderr
    for name in ("last.pt", "last.prev.pt"):
        result = CliRunner().invoke(CKPT, ["verify", str(run / "weights" / name)])
        assert result.exit_code == 0, (name, result.output)
    assert load(run / "weights" / "last.pt")["progress"]["epoch"] == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    [["--lr0", "0.004", "--allow-change", "lr0"], ["--img-size", "96", "--allow-change", "img-size"]],
    ids=["lr0", "img-size"],
)
def test_other_allowed_changes_run_to_the_end_and_every_save_verifies(tiny_data, tmp_path, change):
    """Issue 24 (item 5): lr0 applies from the resume on, on the same schedule position (asserted against the
    formula from TensorBoard's per-step lr); a new image size trains on from the same step.  Every save after the
    resume verifies, val reads the result, and the audit names the change and passes."""
    run = tmp_path / "runs" / "fuse" / "exp"
    stopped = run_train(["--data", str(tiny_data), *TINY], tmp_path, env={"FUSE_TRAIN_STOP_AFTER_STEP": "6"})
    assert stopped.returncode == 130, stopped.stderr
    resumed = run_train(["--resume", str(run / "weights" / "last.pt"), *change], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    for path in sorted((run / "weights").glob("*.pt")):
        result = CliRunner().invoke(CKPT, ["verify", str(path)])
        assert result.exit_code == 0, (path.name, result.output)
    ckpt = load(run / "weights" / "last.pt")
    assert ckpt["progress"]["global_step"] == 12 and ckpt["history"][-1]["changes"][0]["field"] == change[-1]
    lr = dict(tb_scalars(run)["lr/pg0"])
    args = ckpt["train_args"]
    schedule = LRSchedule(
        args["lr0"], args["lrf"], args["momentum"], round(args["warmup_epochs"] * 4), 12, args["schedule"]
    )
    for g in range(7, 13):  # logged after each step: the lr applied at step g - 1, from the new settings
        assert lr[g] == pytest.approx(schedule.lr(g - 1), rel=1e-6), g
    audit = CliRunner().invoke(CKPT, ["audit", str(run)])
    assert audit.exit_code == 0 and f"{change[-1]} " in audit.output, audit.output
    val = run_train(["val", "-w", str(run / "weights" / "last.pt"), "--json"], tmp_path)
    assert val.returncode == 0, val.stderr
