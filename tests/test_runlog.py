"""Curves people can trust after a resume: TensorBoard scalars of an interrupted and resumed run equal the
uninterrupted run's step for step (CPU, fixed seed), no step twice; results.csv and plots in the run folder."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.helpers import TINY, run_train, tb_scalars

pytestmark = pytest.mark.slow  # end-to-end training runs


scalars = tb_scalars


def test_three_different_interruptions_leave_the_uninterrupted_curves(reference_run, tiny_data, tmp_path):
    args = ["--data", str(tiny_data), *TINY, "--save-every", "2", "--plots"]  # the plots: test below
    last = tmp_path / "runs" / "fuse" / "exp" / "weights" / "last.pt"
    first = run_train(args, tmp_path, env={"FUSE_TRAIN_STOP_AFTER_STEP": "3"})  # Ctrl-C after step 3
    assert first.returncode == 130, first.stderr
    # what a run killed minutes after its last save leaves: events past the checkpoint (here: steps 4-6, values
    # that the resumed run will not reproduce); the resume must purge them
    from torch.utils.tensorboard import SummaryWriter

    orphans = SummaryWriter(str(last.parent.parent))
    for step in (4, 5, 6):
        orphans.add_scalar("train/box_loss", 99.0, step)
        orphans.add_scalar("lr/pg0", 99.0, step)
    orphans.close()
    killed = run_train(["--resume", str(last)], tmp_path, env={"FUSE_TRAIN_SIGNAL_AFTER_STEP": "KILL:7"})
    assert killed.returncode == -9  # kill -9 after step 7: last save at step 6, events of step 7 may be written
    term = run_train(["--resume", str(last)], tmp_path, env={"FUSE_TRAIN_SIGNAL_AFTER_STEP": "TERM:10"})
    assert term.returncode == 143, term.stderr
    final = run_train(["--resume", str(last)], tmp_path)
    assert final.returncode == 0, final.stderr

    ours, reference = scalars(last.parent.parent), scalars(reference_run[0])
    assert set(ours) == set(reference) and "train/box_loss" in ours and "lr/pg0" in ours
    for tag, points in ours.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: a step appears twice"
        assert points == reference[tag], f"{tag} differs from the uninterrupted run"
    assert (last.parent.parent / "results.csv").read_text() == (reference_run[0] / "results.csv").read_text()
    from ckpttools.commands.audit import audit  # and the audit calls all three resumes seamless

    report = audit(last.parent.parent)
    assert report.ok and len(report.lineage) == 4, report.to_dict()
    # the plots people look for, drawn across the resumes
    for name in ("results.png", "PR_curve.png", "F1_curve.png", "confusion_matrix.png", "labels.png"):
        with Image.open(last.parent.parent / name) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 300, name


def test_no_plots_writes_the_logs_and_no_figures(reference_run):
    run = reference_run[0]  # a TINY run: --no-plots
    assert list(run.glob("events.out.tfevents.*")) and (run / "results.csv").exists()
    assert not list(run.glob("*.png"))
