"""What the benchmarks share: run one side in a fresh process, warm the page cache, print the median table.

Importing it compiles our packages to bytecode and lets child processes use it (``as_installed``)."""

from __future__ import annotations

import atexit
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("op_s", "process_s", "rss_mb")


def as_installed() -> None:
    """Let the measured processes start as an installed package starts: from compiled bytecode.

    pip writes the .pyc files when it installs a package (torch's ship compiled in its wheel). A machine that sets
    PYTHONDONTWRITEBYTECODE (this one does) makes an editable checkout compile every module from source in every
    process, about 50 ms of ours per start that no user pays. So: compile our packages once, as pip would, and let
    the children read (and keep) bytecode."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    for package in ("ckpttools", "fuse_train"):
        compileall.compile_dir(ROOT / package, quiet=1)


as_installed()


# A training-shaped checkpoint generator (model, EMA, AdamW moments) for the diff and convert benches: a
# template (braces doubled) defining ``per`` 16 MiB tensors per group, ``model`` and ``ckpt(model)``.
TRAINING_CKPT = r"""
import sys, torch
gib = float(sys.argv[-1]); n = 4 << 20
per = max(1, int(gib * (1 << 30) / 4 / (n * 4)) + 1)
g = torch.Generator().manual_seed(0)
model = {{f"layer{{i}}.weight": torch.randn(n, generator=g) for i in range(per)}}
def ckpt(m):
    return {{"epoch": 3, "model": m, "ema": {{k: v * 0.99 for k, v in m.items()}},
            "optimizer": {{"state": {{i: {{"exp_avg": torch.full((n,), 1e-3),
                                         "exp_avg_sq": torch.full((n,), 1e-6)}}
                                    for i in range(per)}},
                          "param_groups": [{{"lr": 0.001, "params": list(range(per))}}]}},
            "train_args": {{"lr0": 0.01}}}}
"""


def scratch_folder(given: Path | str | None, prefix: str) -> Path:
    """Where a bench writes its files: the folder given (created, kept), or a temporary one removed when the bench
    exits (the benches write gigabytes; left behind, a few runs fill a disk)."""
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def bench_args(doc: str, default_gb: float, prefix: str, more=None):
    """The benches' shared options (--gb, --repeats, --keep; ``more(parser)`` adds a bench's own) and the folder
    for the generated files."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if more is not None:
        more(parser)
    parser.add_argument("--gb", type=float, default=default_gb)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="folder for the generated files (default: temporary)")
    args = parser.parse_args()
    return args, scratch_folder(args.keep, prefix)


def generate(code: str, *paths: Path, gb: float) -> None:
    """Run a generator template once, unless its outputs exist (kept with --keep)."""
    if all(p.exists() for p in paths):
        return
    print(f"generating {', '.join(p.name for p in paths)} ({gb} GiB each) in {paths[0].parent} ...", flush=True)
    subprocess.run([sys.executable, "-c", code.format(root=str(ROOT)), *map(str, paths), str(gb)], check=True)


def run_child(code: str, *args: Path) -> dict:
    """Run ``code`` (a template with {root}) in a fresh interpreter; it prints a dict literal as its last line."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code.format(root=str(ROOT)), *map(str, args)], capture_output=True, text=True, check=True
    )
    result = eval(out.stdout.strip().splitlines()[-1])  # our own child's dict literal
    result["process_s"] = time.perf_counter() - t0
    return result


def warm(*paths: Path) -> None:
    """Read the files once so both sides find them in the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def spread(values: list[float], fmt: str) -> str:
    """A figure as the benches report it: the median and the range (min-max) of its rounds."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(
    rows: dict[str, list[dict]],
    labels: dict[str, str],
    ours: str,
    baseline: str,
    wall_target: float,
    rss_target: float = 400,
    nbytes: int | None = None,
) -> None:
    """Table of medians with their range (min-max) over the alternated runs, the ratios per round (ours and the
    baseline of the same round) as median and range, throughput, and whether the targets (wall <= wall_target x
    baseline, RSS <= rss_target MB) are met by the medians."""
    med = {k: {m: statistics.median(r[m] for r in v) for m in METRICS} for k, v in rows.items()}
    print("| | operation s | whole process s | peak RSS MB |")
    print("|---|---|---|---|")
    for key in (baseline, ours):
        r = rows[key]
        print(
            f"| {labels[key]} | {spread([x['op_s'] for x in r], '.2f')} | "
            f"{spread([x['process_s'] for x in r], '.2f')} | {spread([x['rss_mb'] for x in r], '.0f')} |"
        )
    b, o = med[baseline], med[ours]
    per_round = {m: [x[m] / y[m] for x, y in zip(rows[ours], rows[baseline])] for m in METRICS}
    print(
        f"\nratio {ours} / {baseline}, per round: operation {spread(per_round['op_s'], '.3f')}, whole process "
        f"{spread(per_round['process_s'], '.3f')}, peak RSS {spread(per_round['rss_mb'], '.3f')}"
    )
    if nbytes:
        print(
            f"throughput of the operation: {ours} {nbytes / o['op_s'] / 1e9:.2f} GB/s, "
            f"{baseline} {nbytes / b['op_s'] / 1e9:.2f} GB/s"
        )
    print(
        f"targets: wall <= {wall_target:.2f} x baseline -> "
        f"{'met' if o['process_s'] <= wall_target * b['process_s'] else 'NOT met'} (whole process), "
        f"peak RSS <= {rss_target:.0f} MB -> {'met' if o['rss_mb'] <= rss_target else 'NOT met'}"
    )


def median_seconds(argv: list[str], repeats: int = 5) -> float:
    """Median wall time of a whole command (start-up included)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
