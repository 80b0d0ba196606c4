"""What a person reads from `ckpt verify` and `ckpt repair` (issue 26): the summary first (verdict, what
happened, what to do), at most a screen of grouped findings, everything with --all and in --json, no line wider
than the terminal and no trailing padding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from click.testing import CliRunner

from ckpttools.cli import main as CKPT


def _truncated(tmp_path, fraction=0.6):
    g = torch.Generator().manual_seed(0)
    state = {
        i: {"exp_avg": torch.randn(64, generator=g), "exp_avg_sq": torch.rand(64, generator=g)} for i in range(400)
    }
    full = tmp_path / "full.pt"
    torch.save(
        {"model": {f"layer{i}.weight": torch.randn(8, generator=g) for i in range(100)}, "optimizer": {"state": state}},
        full,
    )
    data = full.read_bytes()
    cut = tmp_path / "last.pt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


def _run(args, columns=80):
    return CliRunner().invoke(CKPT, args, prog_name="ckpt", terminal_width=columns, env={"COLUMNS": str(columns)})


def test_a_truncated_checkpoint_is_a_summary_and_one_screen(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the path as a user types it (a long temporary path would wrap inside itself)
    path = _truncated(tmp_path).relative_to(tmp_path)
    result = _run(["verify", str(path)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) <= 40, result.stdout
    assert all(len(line) <= 80 and line == line.rstrip() for line in lines), result.stdout
    head = " ".join(" ".join(lines[:8]).split())  # wrapped lines joined back
    assert lines[2].startswith("FAILED: ") and "the file ends early" in head and f"ckpt repair {path}" in head
    assert "zip.record-missing x" in result.stdout and "--all" in result.stdout
    # everything is still there for who asks: --all lists each, --json counts them all
    every = _run(["verify", "--all", str(path)])
    report = json.loads(_run(["verify", "--json", str(path)]).stdout)
    missing = report["counts"]["errors"]
    assert every.stdout.count("zip.record-missing at") == sum(
        f["code"] == "zip.record-missing" for f in report["findings"]
    )
    assert missing > 100 and len(every.stdout.splitlines()) > 200


def test_repair_of_a_truncated_checkpoint_says_how_much_was_lost_in_a_few_lines(tmp_path):
    path = _truncated(tmp_path)
    result = _run(["repair", str(path), "-o", str(tmp_path / "fixed.pt")])
    assert result.exit_code == 1 and not (tmp_path / "fixed.pt").exists()
    assert len(result.stdout.splitlines()) <= 12, result.stdout
    assert "lost: " in result.stdout and "in optimizer (" in result.stdout


def test_code_references_are_one_entry_per_library(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten())
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    result = _run(["verify", str(path)])
    assert result.exit_code == 0
    assert result.stdout.count("safety.code-reference") == 1
    assert "torch: Sequential, Conv2d, BatchNorm2d, ReLU, Flatten" in " ".join(result.stdout.split())
    listed = _run(["verify", "--all", str(path)])
    assert listed.stdout.count("safety.code-reference at") == 5


def test_positions_are_counted_as_people_count():
    """Issue 24: one epoch numbering for people, from 1, as results.csv and the log lines count; a checkpoint
    saved mid-epoch says so.  (The checkpoints' own 'epoch' keys keep their meaning: the last completed epoch,
    0-based, -1 for none, as Ultralytics writes it.)"""
    from ckpttools.trainers.fuse_train import RULES as FUSE
    from ckpttools.trainers.ultralytics import RULES as ULTRA

    mid = {"progress": {"epoch": 1, "step_in_epoch": 5, "steps_per_epoch": 20}, "train_args": {"epochs": 3}}
    assert FUSE.position(mid) == "in epoch 2 of 3, step 5 of 20 (saved mid-epoch)"
    end = {"progress": {"epoch": 2, "step_in_epoch": 0, "steps_per_epoch": 20}, "train_args": {"epochs": 3}}
    assert FUSE.position(end) == "2 of 3 epochs done"
    assert ULTRA.position({"epoch": 0, "train_args": {"epochs": 3}}) == "1 of 3 epochs done"
    assert ULTRA.position({"epoch": -1}) == "final: training finished, optimizer stripped"


def test_names_print_as_they_are_never_as_emoji_or_markup(tmp_path):
    """Tensor names are text: rich would turn ":fire:" into an emoji (and "[bold]" into style) if asked to; the
    commands print both as written, piped to a file the way a script reads them."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"layer:fire:.weight": torch.zeros(2), ":smile:": torch.ones(3), "[bold red]w[/]": torch.ones(1)}, a)
    torch.save({"layer:fire:.weight": torch.ones(2)}, b)
    for args in (["inspect", str(a)], ["diff", str(a), str(b)]):
        result = subprocess.run(
            [sys.executable, "-m", "ckpttools.cli", *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode in (0, 1), result.stderr
        for name in (
            ("layer:fire:.weight", ":smile:", "[bold red]w[/]") if args[0] == "inspect" else ("layer:fire:.weight",)
        ):
            assert name in result.stdout, (name, result.stdout)
        assert not any(ord(c) > 0x2FFF for c in result.stdout), result.stdout  # no emoji


def test_nan_and_huge_values_are_findings_never_warnings_on_stderr(tmp_path):
    """The NaN/Inf test squares values: NaN and finite values past the square root of the largest float
    overflow in numpy, which warns on stderr unless told not to.  A user sees the finding, nothing else."""
    path = tmp_path / "nan.pt"
    big = torch.full((300_000,), 3e30)  # past SMALL_RECORD: scanned on the pass's pool threads
    big[7] = float("nan")
    torch.save(
        {"w": torch.tensor([1.0, float("nan"), 3e30]), "d": torch.tensor([1e200, float("inf")]), "big": big}, path
    )
    for args in (["verify", str(path)], ["inspect", str(path)], ["repair", str(path), str(tmp_path / "out.pt")]):
        result = subprocess.run(
            [sys.executable, "-m", "ckpttools.cli", *args], capture_output=True, text=True, timeout=120
        )
        assert "Warning" not in result.stderr and "Warning" not in result.stdout, (args, result.stderr)
    verified = subprocess.run(
        [sys.executable, "-m", "ckpttools.cli", "verify", str(path)], capture_output=True, text=True, timeout=120
    )
    assert verified.returncode == 1 and "values.nonfinite" in verified.stdout, verified.stdout


def test_counts_read_as_english_one_line_each_however_long_the_paths(tmp_path):
    """ "1 tensor, 4 B", "OK: 0 errors, 1 warning": counts with the noun they count, sizes in the unit that
    suits them; a conversion's summary and notes stay one line each when piped, so a log keeps them whole."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    one = deep / "one.pt"
    torch.save({"a": torch.zeros(1)}, one)
    for target, size in (("one.safetensors", "4 B"), ("one.h5", "4 B")):
        out = subprocess.run(
            [sys.executable, "-m", "ckpttools.cli", "convert", str(one), str(deep / target)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "80"},
        )
        assert out.returncode == 0, out.stderr
        first = out.stdout.splitlines()[0]
        assert first.startswith(f"converted {one} -> {deep / target}: 1 tensor, {size} in "), out.stdout
        assert "(s)" not in out.stdout and "1 tensors" not in out.stdout, out.stdout
    verified = _run(["verify", str(one)])
    assert "OK: 0 errors, 0 warnings" in verified.output, verified.output
    inspected = _run(["inspect", str(one)])
    assert "cpu (1 storage)" in inspected.output, inspected.output


def test_counted_says_one_or_many():
    from ckpttools.report import counted

    assert [counted(n, "tensor") for n in (0, 1, 2, 1024)] == ["0 tensors", "1 tensor", "2 tensors", "1,024 tensors"]
    assert (counted(2, "epoch"), counted(2, "process", "processes")) == ("2 epochs", "2 processes")


def test_summary_lines_break_between_facts_never_inside_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(1000)}, tmp_path / "w.pt")
    lines = _run(["verify", "w.pt"], columns=40).output.splitlines()
    assert lines[1:3] == ["  torch-zip · state-dict", "  1,000 parameters"], lines
    lines = _run(["inspect", "w.pt"], columns=40).output.splitlines()
    assert "  parameter count: 1,000  tensors: 1" in lines, lines
    assert all(len(line) <= 40 for line in lines), lines
