"""The CUDA check script runs to the end on a CPU-only machine: CUDA rows skipped with their reason, the resume
row bitwise on CPU, the async-save row measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # trains on the demo data
def test_cuda_check_runs_here_and_says_what_it_skipped(tmp_path):
    import torch

    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cuda_check.py"), "--out", str(tmp_path), "--img-size", "64"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    assert "| interrupt + resume, deterministic | ok |" in table and "max |weight difference| 0 " in table
    assert "| async save stall | ok |" in table
    if not torch.cuda.is_available():
        assert table.count("| skipped |") == 7 and "no CUDA device" in table
