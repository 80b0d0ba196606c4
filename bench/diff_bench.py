"""`ckpt diff` against the usual script: two torch.load calls + a tensor-by-tensor comparison.

    python bench/diff_bench.py [--gb 1.0] [--repeats 3] [--keep DIR]

Generates two checkpoints of at least --gb GiB each (model, EMA, AdamW moments) that differ in three tensors,
then runs each side in a fresh process, alternating, --repeats times, after reading both files once so they
sit in the page cache.  Reports wall time and peak RSS with ratios.
Targets (issue 17): wall <= 0.25 x the baseline, peak RSS <= 200 MB.  Tensors whose zip records have the same
size and CRC32 on both sides are equal by CRC and not read (`--exact` reads them).
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
changed = dict(model)
for i in (0, per // 2, per - 1):
    changed[f"layer{{i}}.weight"] = model[f"layer{{i}}.weight"] + 1e-3
torch.save(ckpt(changed), sys.argv[2])
"""
)

BASELINE = r"""
import resource, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
a = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
b = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
changed = []
def walk(x, y, path):
    if isinstance(x, torch.Tensor):
        if x.shape != y.shape or not torch.equal(x, y):
            d = (x.double() - y.double()).abs()
            changed.append((path, float(d.max()), float(d.mean())))
    elif isinstance(x, dict):
        for k in x:
            if k in y: walk(x[k], y[k], f"{{path}}/{{k}}")
    elif isinstance(x, (list, tuple)):
        for i, (p, q) in enumerate(zip(x, y)): walk(p, q, f"{{path}}[{{i}}]")
walk(a, b, "")
t2 = time.perf_counter()
print({{"op_s": t2 - t1, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "changed": len(changed)}})
"""

DIFF = r"""
import resource, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from ckpttools.commands.diff import diff_checkpoints
t1 = time.perf_counter()
r = diff_checkpoints(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print({{"op_s": t2 - t1, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "changed": len(r.changed), "verdict": r.verdict}})
"""


def main() -> int:
    args, folder = bench_args(__doc__, 1.0, "diff-bench-")
    a, b = folder / "a.pt", folder / "b.pt"
    generate(MAKE, a, b, gb=args.gb)
    warm(a, b)
    rows = {"baseline": [], "diff": []}
    for _ in range(args.repeats):
        rows["baseline"].append(run_child(BASELINE, a, b))
        rows["diff"].append(run_child(DIFF, a, b))
    print(
        f"\nfiles: {a.stat().st_size / (1 << 30):.2f} + {b.stat().st_size / (1 << 30):.2f} GiB, median of "
        f"{args.repeats}"
    )
    print(
        f"tensors found different: baseline {rows['baseline'][0]['changed']}, ckpt diff {rows['diff'][0]['changed']} "
        f"(verdict {rows['diff'][0]['verdict']})"
    )
    report(
        rows,
        {"baseline": "2 x torch.load + tensor-by-tensor compare", "diff": "ckpt diff"},
        "diff",
        "baseline",
        0.25,
        rss_target=200,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
