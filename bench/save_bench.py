"""What checkpoint saves cost fuse-train: training time with no saves, with a save every K steps written
synchronously, and written by the background writer (the default).

    python bench/save_bench.py [--scales n,s] [--steps 60] [--every 20] [--img-size 128]

Each configuration trains the same steps on the demo data in a fresh process (CPU, seed 0, one epoch cut to
--steps), saves timed inside the process: the **stall** is what the training thread waits per save (a
snapshot for async; the whole write for sync).  Prints per scale: seconds per step without saves, the save
size, stall per save sync and async, their ratio, and the overhead of saving every K steps in % of training
time.  Targets (issue 17): async stall <= 10 % of the sync save; saving every 200 steps costs <= 2 % (scale s).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import os, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(2)
from pathlib import Path
from fuse_train.config import RunConfig
from fuse_train.demo import ensure_demo
from fuse_train.trainer import Trainer
scale, steps, every, mode, img, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
cfg = RunConfig(data=str(ensure_demo()), scale=scale, epochs=1, batch=8, img_size=img, workers=0, device="cpu",
                seed=0, async_save=(mode == "async"), project=out, name=mode)
trainer = Trainer(cfg, Path(out) / mode)
trainer.run_dir.mkdir(parents=True, exist_ok=True)
from fuse_train.runlog import RunLog
trainer.runlog = RunLog(trainer.run_dir, 0, {{}}, enabled=False)
loader = trainer.make_loader(trainer.train_set, trainer.sampler)
trainer.train_model.train()
stalls, t0, done = [], time.perf_counter(), 0
for images, targets, _ in loader:
    trainer.schedule.apply(trainer.optimizer, trainer.global_step)
    trainer._step(images, targets)
    trainer.global_step += 1; trainer.step_in_epoch += 1; done += 1
    if mode != "none" and done % every == 0:
        s = time.perf_counter(); trainer.save(); stalls.append(time.perf_counter() - s)
    if done >= steps:
        break
if trainer.saver is not None:
    trainer.saver.wait()
total = time.perf_counter() - t0
size = (trainer.weights_dir / "last.pt").stat().st_size if mode != "none" else 0
import statistics
later = stalls[1:] or stalls  # the first save also allocates the reused snapshot buffers
print({{"total_s": total, "stall_s": statistics.median(later) if later else 0.0, "first_stall_s": stalls[0] if stalls else 0.0,
        "saves": len(stalls), "size": size}})
"""


def run(scale: str, steps: int, every: int, mode: str, img: int, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), scale, str(steps), str(every), mode,
                           str(img), str(out)], capture_output=True, text=True, check=True)
    return eval(proc.stdout.strip().splitlines()[-1])  # our own child's dict literal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="n,s")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--img-size", type=int, default=128)
    args = parser.parse_args()
    print("| scale | s / step (no saves) | save MB | sync stall s | async stall s (first) | async / sync | "
          "overhead sync % | overhead async % | async overhead at 1 save / 200 steps % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for scale in args.scales.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            base = run(scale, args.steps, args.every, "none", args.img_size, Path(tmp))
            sync = run(scale, args.steps, args.every, "sync", args.img_size, Path(tmp))
            asyn = run(scale, args.steps, args.every, "async", args.img_size, Path(tmp))
        per_step = base["total_s"] / args.steps
        over = {k: 100 * (r["total_s"] - base["total_s"]) / base["total_s"] for k, r in (("sync", sync), ("async", asyn))}
        # the cost of one save (its stall plus what the background write takes from training) spread over 200 steps
        async_cost_per_save = max(0.0, asyn["total_s"] - base["total_s"]) / max(1, asyn["saves"])
        per_200 = 100 * async_cost_per_save / (200 * per_step)
        print(f"| {scale} | {per_step:.3f} | {asyn['size'] / 2**20:.1f} | {sync['stall_s']:.3f} | {asyn['stall_s']:.3f} "
              f"({asyn['first_stall_s']:.3f}) | "
              f"{asyn['stall_s'] / sync['stall_s']:.2f} | {over['sync']:.1f} | {over['async']:.1f} | {per_200:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
