"""Option values are checked when parsed (issue 26): a nonsense value is one line and exit 2, never a run that
starts with it; every --help fits an 80-column terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CKPT = [sys.executable, "-m", "ckpttools.cli"]
FUSE = [sys.executable, "-m", "fuse_train"]

NONSENSE = [
    (CKPT, ["diff", "--atol", "-1", "a.pt", "b.pt"], "--atol"),
    (CKPT, ["diff", "--rtol", "-0.5", "a.pt", "b.pt"], "--rtol"),
    (CKPT, ["diff", "--top", "0", "a.pt", "b.pt"], "--top"),
    (CKPT, ["preflight", "--batch", "-4", "last.pt"], "--batch"),
    (CKPT, ["preflight", "--lr0", "0", "last.pt"], "--lr0"),
    (CKPT, ["preflight", "--img-size", "100", "last.pt"], "--img-size"),
    (CKPT, ["preflight", "--epochs", "0", "last.pt"], "--epochs"),
    (CKPT, ["remap", "--gpus", "0", "last.pt", "-o", "x.pt"], "--gpus"),
    (CKPT, ["convert", "--world-size", "0", "a.pt", "b"], "--world-size"),
    (FUSE, ["train", "--batch", "0"], "--batch"),
    (FUSE, ["train", "--epochs", "-1"], "--epochs"),
    (FUSE, ["train", "--img-size", "100"], "--img-size"),
    (FUSE, ["train", "--lr0", "-0.01"], "--lr0"),
    (FUSE, ["train", "--momentum", "1.5"], "--momentum"),
    (FUSE, ["train", "--workers", "-2"], "--workers"),
    (FUSE, ["val", "--conf", "2", "-w", "last.pt"], "--conf"),
    (FUSE, ["val", "--iou", "-0.1", "-w", "last.pt"], "--iou"),
    (FUSE, ["predict", "--conf", "1.5", "-w", "last.pt", "x.jpg"], "--conf"),
]


@pytest.mark.parametrize("program,args,option", NONSENSE, ids=[" ".join(a) for _, a, _ in NONSENSE])
def test_nonsense_values_exit_2_naming_the_option(tmp_path, program, args, option):
    proc = subprocess.run(program + args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"Invalid value for '{option}'" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was started, nothing written


def _commands(program: list[str]) -> list[str]:
    if program is CKPT:
        from ckpttools.cli import main as group
    else:
        from fuse_train.cli import cli as group
    return sorted(group.commands)


@pytest.mark.parametrize("program", [CKPT, FUSE], ids=["ckpt", "fuse-train"])
def test_every_help_fits_80_columns(program):
    commands = _commands(program)
    assert len(commands) >= 5
    for command in [None, *commands]:
        argv = program + ([command] if command else []) + ["--help"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "COLUMNS": "80"}).stdout
        wide = [line for line in out.splitlines() if len(line) > 80]
        assert out and not wide, (command, wide)
