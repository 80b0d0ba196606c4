"""What checkpoint saves cost fuse-train: training time with no saves, with a save every K steps written
synchronously, written by the background writer (the default), and as DCP folders by ``dcp.async_save``
(``--save-format dcp``).

    python bench/save_bench.py [--scales n,s] [--steps 120] [--every 40] [--img-size 128] [--repeats 3]

Each configuration trains the same steps on the demo data in a fresh process (CPU, seed 0, as many epochs as
--steps needs), every mode --repeats times, interleaved; medians are printed.  Timed inside the process: the
**stall** is what the training thread waits per save (a snapshot for async and DCP; the whole write for
sync); the **cost** of a save is its stall plus how much slower the steps ran while a writer worked than the
same run's steps with no writer at work (their median; so drift between runs does not enter).  Prints per
scale: seconds per step, the save size, stalls, their ratio, the cost as % of the training between two saves,
and that cost spread over 200 steps.  Targets (issue 17): async stall <= 10 % of the sync
save; saving every 200 steps costs <= 2 % (scale s).
"""

from __future__ import annotations

import argparse
import statistics
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
scale, steps, every, mode, img, out = sys.argv[1:7]
steps, every, img = int(steps), int(every), int(img)
cfg = RunConfig(data=str(ensure_demo()), scale=scale, epochs=1, batch=8, img_size=img, workers=0, device="cpu",
                seed=0, async_save=(mode in ("async", "dcp")), save_format="dcp" if mode == "dcp" else "pt",
                project=out, name=mode)
trainer = Trainer(cfg, Path(out) / mode)
trainer.run_dir.mkdir(parents=True, exist_ok=True)
from fuse_train.runlog import RunLog
trainer.runlog = RunLog(trainer.run_dir, 0, {{}}, enabled=False)
trainer.train_model.train()
writers = [w for w in (trainer.saver, trainer.dcp_saver) if w is not None]
stalls, steps_seen, done, epoch = [], [], 0, 0
t0 = time.perf_counter()
while done < steps:  # as many epochs as --steps needs (the demo has 40 steps an epoch at batch 8)
    trainer.sampler.set_epoch(epoch)
    for images, targets, _ in trainer.make_loader(trainer.train_set, trainer.sampler):
        busy = any(w.busy for w in writers)
        s = time.perf_counter()
        trainer.schedule.apply(trainer.optimizer, trainer.global_step)
        trainer._step(images, targets)
        trainer.global_step += 1; trainer.step_in_epoch += 1; done += 1
        steps_seen.append((time.perf_counter() - s, busy or any(w.busy for w in writers)))
        # no save at the very end: its write would be waited for
        if mode != "none" and done % every == 0 and done < steps:
            s = time.perf_counter(); trainer.save(); stalls.append(time.perf_counter() - s)
        if done >= steps:
            break
    epoch += 1
total = time.perf_counter() - t0
trainer._wait_for_saves()
last = trainer.last_path
size = 0 if mode == "none" else sum(f.stat().st_size for f in last.iterdir()) if last.is_dir() else last.stat().st_size
import statistics
later = stalls[1:] or stalls  # the first save also allocates the reused snapshot buffers
# What the saves cost this run: the stalls, plus how much slower the steps ran while a writer was at work than
# the steps of the same run with no writer (their median), so drift between runs does not enter.  The first
# steps warm up and are left out.
measured = steps_seen[3:]
quiet = [t for t, busy in measured if not busy]
median_step = statistics.median(quiet)
slowdown = sum(t - median_step for t, busy in measured if busy)
print({{"total_s": total, "stall_s": statistics.median(later) if later else 0.0,
        "first_stall_s": stalls[0] if stalls else 0.0, "saves": len(stalls), "size": size,
        "median_step_s": median_step, "excess_s": sum(stalls) + slowdown,
        "busy_steps": sum(busy for _, busy in measured)}})
"""


def run(scale: str, steps: int, every: int, mode: str, img: int, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), scale, str(steps), str(every), mode, str(img), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return eval(proc.stdout.strip().splitlines()[-1])  # our own child's dict literal


MODES = ("none", "sync", "async", "dcp")


def measure(scale: str, args) -> dict[str, dict]:
    """Every mode ``--repeats`` times, interleaved (the order rotates each round, so drift in the machine's speed
    falls on every mode alike); per mode the median total and the median stall over the rounds."""
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                runs[mode].append(run(scale, args.steps, args.every, mode, args.img_size, Path(tmp) / f"{mode}{r}"))
    return {m: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for m, rs in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="n,s")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every mode (medians are reported)")
    args = parser.parse_args()
    print(
        f"{args.steps} steps, a save every {args.every}, {args.repeats} interleaved rounds, medians; cost of a save ="
        " its stall + the steps' slowdown while the writer runs (against the same run's steps with no writer); "
        "overhead = cost / training time between saves"
    )
    print(
        "| scale | s / step (no saves) | save MB | sync stall s | async stall s (first) | async / sync | "
        "overhead sync % | overhead async % | async cost / save s | at 1 save / 200 steps % | dcp.async_save "
        "stall s (first) | dcp / sync | overhead dcp % |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scale in args.scales.split(","):
        m = measure(scale, args)
        base, sync, asyn, dcp = m["none"], m["sync"], m["async"], m["dcp"]
        per_step = base["median_step_s"]
        # the cost of one save: its stall plus how much the steps slowed while the writer ran
        cost = {k: m[k]["excess_s"] / max(1, m[k]["saves"]) for k in ("sync", "async", "dcp")}
        over = {k: 100 * cost[k] / (args.every * per_step) for k in cost}
        per_200 = 100 * cost["async"] / (200 * per_step)
        print(
            f"| {scale} | {per_step:.3f} | {asyn['size'] / 2**20:.1f} | {sync['stall_s']:.3f} | {asyn['stall_s']:.3f} "
            f"({asyn['first_stall_s']:.3f}) | {asyn['stall_s'] / sync['stall_s']:.2f} | {over['sync']:.1f} | "
            f"{over['async']:.1f} | {cost['async']:.3f} | {per_200:.2f} | {dcp['stall_s']:.3f} "
            f"({dcp['first_stall_s']:.3f}) | {dcp['stall_s'] / sync['stall_s']:.2f} | {over['dcp']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
