"""How close an interrupted + resumed Ultralytics run comes to an uninterrupted one, with and without
ckpttools.integrations.ultralytics.  Genuine Ultralytics (dev extra), CPU, the tiny demo dataset, 4 epochs,
cut right after epoch 2's save, then ``resume=True``.

    python bench/ultralytics_resume.py
    python bench/ultralytics_resume.py --yolofuse PATH/TO/YOLOFuse   # YOLOFuse's own trainer (8.3.74 fork), RGB+IR

With ``--yolofuse`` the runs use YOLOFuse's checkout (not on PyPI: ``git clone https://github.com/WangQvQ/YOLOFuse``)
through fixtures/yolofuse_driver.py: its Mid-level-Feature-Fusion model at scale n, ``ch=6``, a tiny RGB+IR set in
its layout; what its 8.3 base needs comes from fixtures/ultralytics83_site.py's cached folder.

Prints, per setting: the largest difference in any epoch's train losses (results.csv), and the largest
difference in the final weights (the stripped last.pt's model, i.e. the fp16 EMA every Ultralytics user ships).
``nbs`` = nominal batch: with nbs > batch Ultralytics accumulates gradients over several batches, and the
counter of its accumulation window is a local variable of its training loop that no checkpoint carries.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Runs:
    """Drives one trainer's runs in subprocesses: genuine Ultralytics 8.4 (the dev extra), or YOLOFuse."""

    def __init__(self, yolofuse: Path | None):
        self.yolofuse = yolofuse
        if yolofuse is None:
            self.driver, path = [sys.executable, str(ROOT / "fixtures" / "ultralytics_driver.py")], str(ROOT)
        else:
            from fixtures.ultralytics83_site import ensure_site

            self.driver = [sys.executable, str(ROOT / "fixtures" / "yolofuse_driver.py"), "--yolofuse", str(yolofuse)]
            path = os.pathsep.join([str(ensure_site()), str(ROOT)])
        self.env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}

    def __call__(self, *args: str) -> None:
        proc = subprocess.run([*self.driver, *args], capture_output=True, text=True, env=self.env)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])

    def final_weights(self, run: Path) -> dict:
        last = run / "weights" / "last.pt"
        if self.yolofuse is None:
            return torch.load(last, map_location="cpu", weights_only=False)["model"].state_dict()
        self("weights", str(last), str(run / "final-weights.pt"))
        return torch.load(run / "final-weights.pt", weights_only=True)


def losses(run: Path) -> list[list[float]]:
    return [
        [float(r[k]) for k in ("train/box_loss", "train/cls_loss", "train/dfl_loss")]
        for r in csv.DictReader(open(run / "results.csv"))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--yolofuse", type=Path, help="a YOLOFuse checkout: bench its trainer instead of Ultralytics")
    drive = Runs(parser.parse_args(argv).yolofuse)
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
                wa, wb = drive.final_weights(tmp / f"{name}-full"), drive.final_weights(tmp / f"{name}-cut")
                wdiff = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
                print(f"| {label} | {nbs} | {max(diff[:2]):.5f} | {max(diff[2:]):.5f} | {wdiff:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
