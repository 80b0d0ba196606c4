"""Train every fusion mode on the demo data with one fixed budget; print mAP and wall time.

    python bench/train_demo.py [--epochs 15] [--modes early,mid,late,rgb,ir] [--out DIR]

Each mode runs through the real `fuse-train` command (a subprocess, so every run pays its own start-up),
on the demo data at its default 128 px, seed 0, CPU.  The table reports the final epoch's metrics (EMA
weights) and the best mAP50 seen, plus wall time.  Target (issue 2): mid fusion reaches mAP50 >= 0.6
within 5 minutes on 2 CPU cores, and every fusion mode beats both single-modality baselines.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from benchlib import scratch_folder


def run_mode(mode: str, epochs: int, out: Path, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "fuse_train",
        "--fusion",
        mode,
        "--epochs",
        str(epochs),
        "--device",
        "cpu",
        "--project",
        str(out),
        "--name",
        mode,
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: fuse-train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rows = list(csv.DictReader((out / mode / "results.csv").read_text().splitlines()))
    last = rows[-1]
    # first epoch at which mAP50 reached 0.6, and the wall time it took (pro rata of the run's epochs)
    reach = next((int(r["epoch"]) for r in rows if float(r["metrics/mAP50"]) >= 0.6), None)
    return {
        "mode": mode,
        "mAP50": float(last["metrics/mAP50"]),
        "mAP50-95": float(last["metrics/mAP50-95"]),
        "best mAP50": max(float(r["metrics/mAP50"]) for r in rows),
        "wall s": wall,
        "epoch at mAP50>=0.6": reach,
        "s to mAP50>=0.6": None if reach is None else wall * reach / len(rows),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--modes", default="early,mid,late,rgb,ir")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args, extra = parser.parse_known_args()
    out = scratch_folder(args.out, "fuse-bench-")
    print(
        f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, cpus {os.cpu_count()}, runs in {out}",
        flush=True,
    )
    results = []
    for mode in args.modes.split(","):
        r = run_mode(mode, args.epochs, out, extra)
        results.append(r)
        print(f"{mode}: done in {r['wall s']:.0f}s", flush=True)
    print(
        "\n| mode | mAP50 | mAP50-95 | best mAP50 | first epoch with mAP50 >= 0.6 | ~s to get there | wall s "
        f"({args.epochs} epochs) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        reach = "-" if r["epoch at mAP50>=0.6"] is None else str(r["epoch at mAP50>=0.6"])
        secs = "-" if r["s to mAP50>=0.6"] is None else f"{r['s to mAP50>=0.6']:.0f}"
        print(
            f"| {r['mode']} | {r['mAP50']:.3f} | {r['mAP50-95']:.3f} | {r['best mAP50']:.3f} | {reach} | {secs} | "
            f"{r['wall s']:.0f} |"
        )
    by = {r["mode"]: r for r in results}
    if {"rgb", "ir"} <= by.keys():
        base = max(by["rgb"]["mAP50"], by["ir"]["mAP50"])
        for m in ("early", "mid", "late"):
            if m in by:
                print(
                    f"{m}: mAP50 {by[m]['mAP50']:.3f} vs best single modality {base:.3f} -> "
                    f"{'beats' if by[m]['mAP50'] > base else 'DOES NOT beat'} both baselines"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
