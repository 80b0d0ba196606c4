"""`ckpt convert` to safetensors and to HDF5 against the usual script: torch.load + safetensors' save_file.

    python bench/convert_bench.py [--gb 2.0] [--repeats 3] [--keep DIR]

Generates one checkpoint of at least --gb GiB (model, EMA, AdamW moments), then runs each side in a fresh
process, alternating, --repeats times, after reading the file once so it sits in the page cache.  The
safetensors side converts the weights (as the baseline does: torch.load of the whole file, then save_file of
the model state dict); the HDF5 side converts the whole checkpoint, which the baseline has no equivalent of.
Reports wall time and peak RSS with ratios.  Target (issue 7): peak RSS <= 400 MB, wall time <= the baseline's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import TRAINING_CKPT, bench_args, generate, report, run_child, warm  # noqa: E402

MAKE = (
    TRAINING_CKPT
    + r"""
torch.save(ckpt(model), sys.argv[1])
"""
)

BASELINE = r"""
import os, resource, sys, time
import torch
from safetensors.torch import save_file
out = sys.argv[2]
if os.path.exists(out): os.remove(out)
t1 = time.perf_counter()
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
save_file(ckpt["model"], out, metadata={{"epoch": str(ckpt["epoch"])}})
t2 = time.perf_counter()
print({{"op_s": t2 - t1, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "out_mb": os.path.getsize(out) / 2**20}})
"""

CONVERT = r"""
import os, resource, sys, time
sys.path.insert(0, {root!r})
from ckpttools.commands.convert import convert
out = sys.argv[2]
if os.path.exists(out): os.remove(out)
t1 = time.perf_counter()
r = convert(sys.argv[1], out, force=True)
t2 = time.perf_counter()
print({{"op_s": t2 - t1, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "out_mb": os.path.getsize(out) / 2**20, "tensors": r.tensors}})
"""


def main() -> int:
    args, folder = bench_args(__doc__, 2.0, "convert-bench-")
    src = folder / "big.pt"
    generate(MAKE, src, gb=args.gb)
    warm(src)
    rows = {"baseline": [], "safetensors": [], "h5": []}
    for _ in range(args.repeats):
        rows["baseline"].append(run_child(BASELINE, src, folder / "base.safetensors"))
        rows["safetensors"].append(run_child(CONVERT, src, folder / "ours.safetensors"))
        rows["h5"].append(run_child(CONVERT, src, folder / "ours.h5"))
    print(
        f"\ninput: {src.stat().st_size / (1 << 30):.2f} GiB, median of {args.repeats}; outputs: safetensors "
        f"{rows['safetensors'][0]['out_mb']:.0f} MB (baseline {rows['baseline'][0]['out_mb']:.0f} MB), "
        f"HDF5 (whole checkpoint) {rows['h5'][0]['out_mb']:.0f} MB"
    )
    labels = {
        "baseline": "torch.load + safetensors save_file",
        "safetensors": "ckpt convert -> .safetensors",
        "h5": "ckpt convert -> .h5 (whole checkpoint)",
    }
    report({k: rows[k] for k in ("baseline", "safetensors")}, labels, "safetensors", "baseline", 1.0)
    print()
    report({k: rows[k] for k in ("baseline", "h5")}, labels, "h5", "baseline", 1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
