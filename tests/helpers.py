"""Shared helpers for end-to-end tests of fuse-train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TINY = ["--epochs", "3", "--batch", "4", "--workers", "0", "--device", "cpu", "--seed", "7"]


def run_train(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fuse_train", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Bitwise view (so NaN == NaN and -0.0 != 0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def tensors_equal(a, b, where: str = "") -> list[str]:
    """Paths at which two nested structures differ (tensors compared bitwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(_bytes(a), _bytes(b))
        return [] if ok else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in tensors_equal(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tensors_equal(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def training_state_differences(a: dict, b: dict) -> list[str]:
    """Everything that must match after an exact resume: weights, EMA, optimizer, counters, metrics."""
    keys = ["model", "ema", "updates", "optimizer", "epoch", "best_fitness", "train_metrics", "results", "scaler"]
    diffs = [d for k in keys for d in tensors_equal(a[k], b[k], k)]
    pa, pb = a["progress"], b["progress"]
    diffs += tensors_equal({k: pa[k] for k in ("epoch", "step_in_epoch", "global_step")},
                           {k: pb[k] for k in ("epoch", "step_in_epoch", "global_step")}, "progress")
    return diffs
