"""Per-tensor overhead (issues 25 and 29): a genuine ``torch.save`` file of N small tensors (200,000 by default),
each command against ``torch.load(weights_only=True)`` of the same file, measured in this run.

Every command runs in a fresh process (wall time and peak RSS, start-up included), in ``--rounds`` rounds that
alternate the baseline and ours, so that a machine that slows down mid-run slows both; the table gives the
median and the range of each.

    python bench/many_tensors_bench.py [--tensors 200000] [--rounds 5] [--commands verify,inspect,diff] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import scratch_folder

TORCH_LOAD = "import sys, torch; torch.load(sys.argv[1], weights_only=True)"
CKPT = "import sys; from ckpttools.cli import main; main(sys.argv[1:])"
MAKE = (
    "import sys, torch; torch.save({f'layer{i}.weight': torch.zeros(2) for i in range(int(sys.argv[2]))}, sys.argv[1])"
)
TARGET = 0.5  # issues 25/29: each command at most half the time of the torch.load(s) it stands for


def timed(code: str, *args: str) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit code) of ``python -c code args`` in a child process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, usage.ru_maxrss / 1024, proc.returncode


def spread(values: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--commands", default="verify,inspect,diff,convert,repair")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    folder = scratch_folder(args.out, "many_tensors_")
    src = folder / f"many{args.tensors}.pt"
    if not src.exists():  # made by a child: this process stays small, so its children's peak RSS is their own
        subprocess.run([sys.executable, "-c", MAKE, str(src), str(args.tensors)], check=True)
    every = {
        "verify": ("ckpt verify", ["verify", str(src)]),
        "inspect": ("ckpt inspect", ["inspect", str(src)]),
        "diff": ("ckpt diff (the file with itself: two opens)", ["diff", str(src), str(src)]),
        "convert": ("ckpt convert -> .pt", ["convert", str(src), str(folder / "out.pt"), "--force"]),
        "repair": ("ckpt repair", ["repair", str(src), "-o", str(folder / "repaired.pt"), "--force"]),
    }
    chosen = {name: every[name] for name in args.commands.split(",")}
    runs: dict[str, list[tuple[float, float, int]]] = {"torch.load": [], **{name: [] for name in chosen}}
    for round_no in range(args.rounds):
        runs["torch.load"].append(timed(TORCH_LOAD, str(src)))
        for name, (_, argv) in chosen.items():
            runs[name].append(timed(CKPT, *argv))
        print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    base = statistics.median(s for s, _, _ in runs["torch.load"])
    print(
        f"{args.tensors:,} tensors, {src.stat().st_size / 1e6:.0f} MB, {args.rounds} alternated rounds, "
        f"{os.cpu_count()} CPUs; median (min-max)"
    )
    print("| command | seconds | x torch.load (median) | peak RSS MB | exit |\n|---|---:|---:|---:|---:|")
    for name, results in runs.items():
        label = every[name][0] if name in every else "torch.load(weights_only=True)"
        seconds = [s for s, _, _ in results]
        ratios = [s / b for s, (b, _, _) in zip(seconds, runs["torch.load"], strict=True)]
        codes = sorted({c for _, _, c in results})
        print(
            f"| {label} | {spread(seconds)} | {spread(ratios)} | {spread([r for _, r, _ in results], '.0f')} | "
            f"{','.join(map(str, codes))} |"
        )
    for name in ("verify", "inspect", "diff", "convert", "repair"):
        if name in runs:
            # diff reads two checkpoints: what it replaces is loading both (2 x torch.load); the others, one
            loads = 2 if name == "diff" else 1
            ratio = statistics.median(s for s, _, _ in runs[name]) / (loads * base)
            what = "loading both (2 x torch.load)" if loads == 2 else "torch.load"
            print(f"target {name} <= {TARGET} x {what}: {ratio:.2f} -> {'met' if ratio <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
