"""How close an interrupted + resumed Ultralytics run comes to an uninterrupted one, with and without
ckpttools.integrations.ultralytics.  Genuine Ultralytics (dev extra), CPU, the tiny demo dataset, 4 epochs,
cut right after epoch 2's save, then ``resume=True``.

    python bench/ultralytics_resume.py

Prints, per setting: the largest difference in any epoch's train losses (results.csv), and the largest
difference in the final weights (the stripped last.pt's model, i.e. the fp16 EMA every Ultralytics user ships).
``nbs`` = nominal batch: with nbs > batch Ultralytics accumulates gradients over several batches, and the
counter of its accumulation window is a local variable of its training loop that no checkpoint carries.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DRIVER = [sys.executable, str(ROOT / "fixtures" / "ultralytics_driver.py")]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def drive(*args: str) -> None:
    proc = subprocess.run([*DRIVER, *args], capture_output=True, text=True, env=ENV)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])


def losses(run: Path) -> list[list[float]]:
    return [
        [float(r[k]) for k in ("train/box_loss", "train/cls_loss", "train/dfl_loss")]
        for r in csv.DictReader(open(run / "results.csv"))
    ]


def final_weights(run: Path) -> dict:
    return torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)["model"].state_dict()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        drive("data", str(tmp / "ds"))
        data = str(tmp / "ds" / "data.yaml")
        print("| integration | nbs (batch 4) | max loss diff, epochs 1-2 | epochs 3-4 | max weight diff (final EMA) |")
        print("|---|---|---|---|---|")
        for nbs in ("4", "64"):
            for label, safe in (("without", []), ("with", ["--safe"])):
                name = f"{label}-{nbs}"
                drive("train", data, str(tmp), f"{name}-full", "--epochs", "4", "--nbs", nbs, *safe)
                drive("train", data, str(tmp), f"{name}-cut", "--epochs", "4", "--nbs", nbs, "--cut", "1", *safe)
                drive("resume", str(tmp / f"{name}-cut" / "weights" / "last.pt"), *safe)
                la, lb = losses(tmp / f"{name}-full"), losses(tmp / f"{name}-cut")
                diff = [max(abs(x - y) for x, y in zip(ra, rb)) for ra, rb in zip(la, lb)]
                wa, wb = final_weights(tmp / f"{name}-full"), final_weights(tmp / f"{name}-cut")
                wdiff = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
                print(f"| {label} | {nbs} | {max(diff[:2]):.5f} | {max(diff[2:]):.5f} | {wdiff:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
