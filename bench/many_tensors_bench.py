"""Per-tensor overhead (issue 25): a genuine ``torch.save`` file of N small tensors (200,000 by default), each
command against ``torch.load(weights_only=True)`` of the same file, measured in this run, each in a fresh
process (wall time).

    python bench/many_tensors_bench.py [--tensors 200000] [--out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCH_LOAD = "import sys, torch; torch.load(sys.argv[1], weights_only=True)"
CKPT = "import sys; from ckpttools.cli import main; main(sys.argv[1:])"


def timed(code: str, *args: str) -> tuple[float, int]:
    """(seconds, exit code) of ``python -c code args`` in a child process."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True)
    return time.perf_counter() - started, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    folder = args.out or Path(tempfile.mkdtemp(prefix="many_tensors_"))
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "many.pt"
    torch.save({f"layer{i}.weight": torch.zeros(2) for i in range(args.tensors)}, src)
    base, _ = timed(TORCH_LOAD, str(src))
    print(f"{args.tensors:,} tensors, {src.stat().st_size / 1e6:.0f} MB; torch.load(weights_only=True): {base:.2f} s")
    print("| command | seconds | x torch.load | exit |\n|---|---:|---:|---:|")
    print(f"| torch.load(weights_only=True) | {base:.2f} | 1.00 | 0 |")
    commands = {
        "ckpt verify": ["verify", str(src)],
        "ckpt inspect": ["inspect", str(src)],
        "ckpt diff (two opens)": ["diff", str(src), str(src)],
        "ckpt convert -> .pt": ["convert", str(src), str(folder / "out.pt"), "--force"],
        "ckpt repair": ["repair", str(src), "-o", str(folder / "repaired.pt"), "--force"],
    }
    for label, argv in commands.items():
        seconds, code = timed(CKPT, *argv)
        print(f"| {label} | {seconds:.2f} | {seconds / base:.2f} | {code} |")


if __name__ == "__main__":
    main()
