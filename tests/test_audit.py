"""`ckpt audit`: passes seamless resumes, flags each planted break with its boundary named."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckpttools.cli import main as ckpt
from ckpttools.commands.audit import AuditReport, _step_series
from tests.helpers import TINY, run_train

SIX = [*TINY[:0], "--epochs", "6", *TINY[2:]]  # TINY with 6 epochs (4 steps each)


def _audit(path: Path):
    res = CliRunner().invoke(ckpt, ["audit", str(path), "--json"])
    assert res.exit_code in (0, 1), res.output
    return res.exit_code, json.loads(res.output)


def _rewrite_results(run: Path, edit) -> None:
    path = run / "results.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0])
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def resumed_run(tiny_data, tmp_path_factory):
    """Six epochs, stopped by Ctrl-C after step 10 (in epoch 3) and resumed: a seamless resume."""
    cwd = tmp_path_factory.mktemp("audit")
    first = run_train(["--data", str(tiny_data), *SIX], cwd, env={"FUSE_TRAIN_STOP_AFTER_STEP": "10"})
    assert first.returncode == 130, first.stderr
    last = cwd / "runs" / "fuse" / "exp" / "weights" / "last.pt"
    done = run_train(["--resume", str(last)], cwd)
    assert done.returncode == 0, done.stderr
    return last.parent.parent


@pytest.mark.slow
def test_a_seamless_resume_passes_and_the_plot_marks_it(resumed_run, tmp_path):
    code, report = _audit(resumed_run)
    assert code == 0 and report["ok"], report
    assert [b["epoch"] for b in report["boundaries"]] == [3.0] and report["boundaries"][0]["verdict"] == "seamless"
    assert report["lineage"][-1]["event"] == "resume" and report["lineage"][-1]["step"] == 10
    res = CliRunner().invoke(
        ckpt, ["audit", str(resumed_run / "weights" / "last.pt"), "--plot", str(tmp_path / "a.png")]
    )
    assert res.exit_code == 0 and (tmp_path / "a.png").stat().st_size > 10_000 and "seamless" in res.output


PLANTS = {  # edit of results.csv, what the report must say, the epoch of the boundary it must call broken
    "duplicated epoch": (lambda rows: rows[:3] + [rows[2]] + rows[3:], "epoch 3 appears twice", 3.0),
    "restart at epoch 0": (
        lambda rows: rows[:2] + [{**r, "epoch": str(i + 1)} for i, r in enumerate(rows[2:])],
        "epoch numbers restart at row 3",
        1.0,
    ),
    "loss spike (optimizer reset)": (
        lambda rows: (
            rows[:2]
            + [
                {
                    **r,
                    "train/cls_loss": str(3 * float(r["train/cls_loss"])),
                    "train/box_loss": str(3 * float(r["train/box_loss"])),
                }
                for r in rows[2:]
            ]
        ),
        "jumps up",
        3.0,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_breaks_in_results_csv_are_flagged(resumed_run, tmp_path, plant):
    run = tmp_path / "exp"
    shutil.copytree(resumed_run, run)
    edit, needle, epoch = PLANTS[plant]
    _rewrite_results(run, edit)
    code, report = _audit(run)
    assert code == 1 and not report["ok"]
    text = json.dumps(report)
    assert needle in text, text
    broken = [b["epoch"] for b in report["boundaries"] if b["verdict"] == "broken"]
    assert epoch in broken, report["boundaries"]


@pytest.mark.slow
def test_a_changed_lr_is_allowed_when_recorded_and_broken_when_not(resumed_run, tmp_path):
    run = tmp_path / "exp"
    shutil.copytree(resumed_run, run)
    last = run / "weights" / "last.pt"
    stopped = run_train(
        ["--resume", str(last), "--epochs", "8", "--allow-change", "epochs"],
        tmp_path,
        env={"FUSE_TRAIN_STOP_AFTER_STEP": "27"},
    )
    assert stopped.returncode == 130, stopped.stderr
    changed = run_train(["--resume", str(last), "--lr0", "0.02", "--allow-change", "lr0"], tmp_path)
    assert changed.returncode == 0, changed.stderr
    code, report = _audit(run)
    lr_boundary = report["boundaries"][-1]
    assert code == 0 and lr_boundary["verdict"] == "allowed", report
    assert "allowed (lr0)" in json.dumps(lr_boundary["checks"])
    # the same curves without the record of the allowed change: an lr that left its schedule
    ckpt_tree = torch.load(last, weights_only=True)
    for event in ckpt_tree["history"]:
        event.pop("changes", None)
    torch.save(ckpt_tree, last)
    code, report = _audit(run)
    assert code == 1 and report["boundaries"][-1]["verdict"] == "broken"
    assert "lr" in json.dumps(report["boundaries"][-1]["checks"])


@pytest.mark.slow
def test_tensorboard_steps_written_twice_are_flagged(resumed_run, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "exp"
    shutil.copytree(resumed_run, run)
    writer = SummaryWriter(str(run))  # a resume that appended without purging
    for step in (9, 10, 11):
        writer.add_scalar("train/box_loss", 0.5, step)
    writer.close()
    code, report = _audit(run)
    assert code == 1 and any("written twice" in p for p in report["problems"])


def _ultralytics_folder(root: Path, epochs: list[int]) -> Path:
    """results.csv as Ultralytics 8 writes it (padded column names, lr per group), no resume record."""
    root.mkdir()
    names = [
        "epoch",
        "train/box_loss",
        "train/cls_loss",
        "train/dfl_loss",
        "metrics/precision(B)",
        "metrics/mAP50(B)",
        "lr/pg0",
        "lr/pg1",
        "lr/pg2",
    ]
    lines = [",".join(f"{n:>20s}" for n in names)]
    for i, e in enumerate(epochs):
        values = [
            e,
            1.5 - 0.05 * i,
            2.0 - 0.1 * i,
            1.2 - 0.02 * i,
            0.3 + 0.05 * i,
            0.2 + 0.05 * i,
            0.01 * (0.9**i),
            0.01 * (0.9**i),
            0.01 * (0.9**i),
        ]
        lines.append(",".join(f"{v:>20.5g}" for v in values))
    (root / "results.csv").write_text("\n".join(lines) + "\n")
    return root


def test_ultralytics_run_folders_continuous_and_restarted(tmp_path):
    code, report = _audit(_ultralytics_folder(tmp_path / "ok", list(range(1, 9))))
    assert code == 0 and report["ok"]
    code, report = _audit(_ultralytics_folder(tmp_path / "restarted", [1, 2, 3, 4, 1, 2, 3, 4]))
    assert code == 1 and any("restart" in p for p in report["problems"])
    assert report["boundaries"][0]["epoch"] == 1.0 and report["boundaries"][0]["verdict"] == "broken"


def test_not_a_run_folder_is_one_line(tmp_path):
    res = CliRunner().invoke(ckpt, ["audit", str(tmp_path)])
    assert res.exit_code == 2 and "no results.csv" in res.output


def test_the_audit_says_what_changed_in_words_and_does_not_call_a_changed_resume_seamless():
    """Issue 24: the lineage shows 'batch 16 -> 8', not a Python list; a run whose resume changed a setting (or
    could not be judged) ends 'OK: no resume looks broken (...)', not 'every resume is seamless'."""
    from rich.console import Console

    from ckpttools.commands.audit import AuditReport, Boundary
    from ckpttools.render import render_audit

    report = AuditReport("runs/fuse/exp", "fuse-train", 3)
    report.lineage = [
        {"event": "resume", "date": "d", "step": 40, "changes": [{"field": "batch", "from": "16", "to": "8"}]}
    ]
    report.boundaries = [
        Boundary(1, 2, "resume at step 40, d", 40, ["batch"], {"counters": "continue by one"}, "allowed")
    ]
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    render_audit(report, console)
    text = console.export_text()
    assert "resume at step 40: batch 16 -> 8" in text and "[{" not in text
    assert "OK: no resume looks broken (1 allowed)" in text and "every resume is seamless" not in text
    report.boundaries[0].verdict = "seamless"
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    render_audit(report, console)
    assert "OK: every resume is seamless" in console.export_text()


def test_the_audit_prints_no_trailing_padding():
    """Like verify (issue 26): the boundary grid is not padded with spaces to the terminal's width."""
    import io

    from rich.console import Console

    from ckpttools.commands.audit import AuditReport, Boundary
    from ckpttools.render import render_audit

    report = AuditReport("runs/fuse/exp", "fuse-train", 3)
    report.boundaries = [Boundary(1, 2, "resume at step 40, d", 40, [], {"counters": "continue by one"})]
    out = io.StringIO()
    render_audit(report, Console(file=out, width=80))
    lines = out.getvalue().splitlines()
    assert any("counters: continue by one" in line for line in lines)
    assert all(line == line.rstrip() for line in lines), lines


def test_a_resumes_purge_is_read_as_tensorboard_shows_it_and_said_in_our_words(tmp_path, capfd):
    # a run logged steps 0-5, was stopped, and resumed from step 3 with purge_step=3 (as fuse-train's RunLog
    # does): TensorBoard drops the old 3-5 and warns about "a TensorFlow restart" on stderr; the audit reads the
    # curve TensorBoard shows, prints no such warning, and notes the purge
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(str(tmp_path))
    for step in range(6):
        first.add_scalar("lr/pg0", float(step), step)
    first.close()
    time.sleep(1.1)  # event file names carry the second they were made in
    resumed = SummaryWriter(str(tmp_path), purge_step=3)
    for step in range(3, 7):
        resumed.add_scalar("lr/pg0", 10.0 + step, step)
    resumed.close()
    report = AuditReport(str(tmp_path))
    series = _step_series(tmp_path, report)
    assert series["lr/pg0"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    assert any("drops the steps a stopped run logged" in n and "(1 resume" in n for n in report.notes)
    assert "TensorFlow" not in capfd.readouterr().err
    assert logging.getLogger("tensorboard").handlers == []  # left as it was
