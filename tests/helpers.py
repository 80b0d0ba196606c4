"""Shared helpers for end-to-end tests of fuse-train."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# --no-plots: a third of a tiny run's CPU is matplotlib (tests/test_runlog.py runs with --plots and looks at them)
TINY = ["--epochs", "3", "--batch", "4", "--workers", "0", "--device", "cpu", "--seed", "7", "--no-plots"]


def run_train(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fuse_train", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def torchrun_command(args: list[str], nproc: int = 2, launcher: list[str] | None = None) -> list[str]:
    """``torchrun --standalone --nproc_per_node N [launcher options] -m fuse_train ARGS`` as an argv."""
    launch = launcher if launcher is not None else ["--standalone", "--nproc_per_node", str(nproc)]
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "fuse_train", *args]


def run_torchrun(
    args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    # PYTHONFAULTHANDLER: a rank that aborts (a rare "terminate called without an active exception" at the end
    # of a 2-rank run, seen under the full suite only) dumps every thread's Python stack into the captured stderr
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    return subprocess.run(torchrun_command(args), cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The deterministic TensorBoard scalars of a run folder as TensorBoard shows them (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fuse_train.training.runlog import DETERMINISTIC_TAGS

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {
        tag: [(e.step, e.value) for e in ea.Scalars(tag)]
        for tag in ea.Tags()["scalars"]
        if tag.startswith(DETERMINISTIC_TAGS)
    }


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Bitwise view (so NaN == NaN and -0.0 != 0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def tensors_equal(a, b, where: str = "") -> list[str]:
    """Paths at which two nested structures differ (tensors compared bitwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(_bytes(a), _bytes(b))
        )
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
    diffs += tensors_equal(
        {k: pa[k] for k in ("epoch", "step_in_epoch", "global_step")},
        {k: pb[k] for k in ("epoch", "step_in_epoch", "global_step")},
        "progress",
    )
    return diffs


def read_through_driver(drive, path: Path) -> dict:
    """An Ultralytics checkpoint's dicts, lists and tensors (model objects as their class name), read by
    ``fixtures/ultralytics_driver.py plain`` through ``drive(*args)``: reading Ultralytics' pickled model imports
    Ultralytics, which patches PIL.Image.open and more process-wide, so never in a test process."""
    out = Path(tempfile.mkdtemp(prefix="plain-")) / "plain.pt"
    try:
        proc = drive("plain", str(path), str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        return torch.load(out, map_location="cpu", weights_only=True)
    finally:
        shutil.rmtree(out.parent)
