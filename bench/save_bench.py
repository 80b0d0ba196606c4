"""What checkpoint saves cost fuse-train: training time with no saves, with a save every K steps written
synchronously, written by the background writer (the default), and as DCP folders by ``dcp.async_save``
(``--save-format dcp``).

    python bench/save_bench.py [--scales n,s] [--steps 120] [--every 40] [--img-size 128] [--repeats 3]
    python bench/save_bench.py --breakdown [--scales n,s]     # where one save's time goes, and the GIL

Modes (``--modes``): ``none``, ``sync`` (``--no-async-save``), ``async`` (the default: the snapshot in the file's
layout, its larger tensors hashed as they are copied, the file written from it), ``async-pass`` (the same arena
filled by one batched torch copy and hashed by the writer's own pass, as before the copy took the hashes),
``async-stream`` (the background writer as before the arena: separate buffers, a digest pass, streamed by
``live_torch`` through the page cache), ``async-torch.save`` (the same with torch.save's own write), ``dcp``.

``--breakdown`` times each phase of one save (median of 5): building the state dict, the snapshot copy (the
training thread's stall), the digest, writing the file (torch.save, and our GIL-free writer), fsync, and the
same through the arena fuse-train now uses (``ckpttools.formats.zipimage``: the snapshot copied into the file's
layout, one CRC32 + digest pass, the file written from it with O_DIRECT); then the training step's median time
while a background thread keeps writing with each, against no writer (the writer thread at nice 19).

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, spread  # noqa: E402

CHILD = r"""
import os, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(2)
from pathlib import Path
from fuse_train.config import RunConfig
from fuse_train.data.demo import ensure_demo
from fuse_train.training.trainer import Trainer
scale, steps, every, mode, img, out = sys.argv[1:7]
steps, every, img = int(steps), int(every), int(img)
stream = mode == "async-stream"  # the background writer as before the arena: separate buffers, live_torch
if mode == "async-pass":  # the arena filled by torch's batched copy, hashed in the writer's own pass
    from fuse_train.checkpoint import async_save
    async_save.HASHED_COPY_MIN = float("inf")
mode = "async" if mode in ("async-stream", "async-pass") else mode
if mode == "async-torch.save":  # the baseline: the background writer with torch.save's own (GIL-holding) write
    from ckpttools.formats import live_torch
    live_torch.save = lambda tree, out: False
cfg = RunConfig(data=str(ensure_demo()), scale=scale, epochs=1, batch=8, img_size=img, workers=0, device="cpu",
                seed=0, async_save=(mode in ("async", "async-torch.save", "dcp")),
                save_format="dcp" if mode == "dcp" else "pt", project=out, name=mode)
trainer = Trainer(cfg, Path(out) / mode)
trainer.snapshot.file_image = not stream
trainer.run_dir.mkdir(parents=True, exist_ok=True)
from fuse_train.training.runlog import RunLog
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
# saves so frequent that a writer is always at work leave no quiet step: then only the wall time compares
median_step = statistics.median(quiet) if quiet else float("nan")
slowdown = sum(t - median_step for t, busy in measured if busy)
print({{"total_s": total, "stall_s": statistics.median(later) if later else 0.0,
        "first_stall_s": stalls[0] if stalls else 0.0, "saves": len(stalls), "size": size,
        "median_step_s": median_step, "excess_s": sum(stalls) + slowdown,
        "busy_steps": sum(busy for _, busy in measured)}})
"""


BREAKDOWN = r"""
import io, os, statistics, sys, tempfile, threading, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(2)
from pathlib import Path
from ckpttools.digest import digest_record
from ckpttools.formats import live_torch, zipimage
from fuse_train.checkpoint.async_save import STARVED_NICE, PinnedSnapshot, _set_priority
from fuse_train.config import RunConfig
from fuse_train.data.demo import ensure_demo
from fuse_train.training.runlog import RunLog
from fuse_train.training.trainer import Trainer
scale, img, out, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cfg = RunConfig(data=str(ensure_demo()), scale=scale, epochs=1, batch=8, img_size=img, workers=0, device="cpu",
                seed=0, project=out, name="b")
tr = Trainer(cfg, Path(out) / "b")
tr.run_dir.mkdir(parents=True, exist_ok=True)
tr.runlog = RunLog(tr.run_dir, 0, {{}}, enabled=False)
tr.train_model.train()
batches = []
for images, targets, _ in tr.make_loader(tr.train_set, tr.sampler):
    batches.append((images, targets))
    if len(batches) == 4:
        break
tr._step(*batches[0])
plain = PinnedSnapshot()  # separate buffers, as before the arena
snap = plain.take(tr.checkpoint_dict())
arena = tr.snapshot  # fuse-train's: the slots of one arena laid out as the file
image = arena.take(tr.checkpoint_dict())
def write(writer):
    with open(Path(out) / "f.pt", "wb") as f:
        writer(f)
        f.flush()
        return f
def fsync():
    fd = os.open(Path(out) / "f.pt", os.O_RDONLY)
    os.fsync(fd); os.close(fd)
names = ("state dict", "snapshot", "digest", "torch.save", "ours", "fsync", "arena snapshot", "arena write",
         "arena fsync")
phases = {{k: [] for k in names}}
def timed(name, fn):  # wall and the process's CPU: every thread, torch's OpenMP threads and the snapshot's copy
    t, c = time.perf_counter(), time.process_time()  # threads too (the kernel's writeback threads are not counted)
    out = fn()
    phases[name].append((time.perf_counter() - t, time.process_time() - c))
    return out
for _ in range(5):
    state = timed("state dict", tr.checkpoint_dict)
    snap = timed("snapshot", lambda: plain.take(state))
    timed("digest", lambda: digest_record(snap))
    timed("torch.save", lambda: write(lambda f: torch.save(snap, f)))
    timed("ours", lambda: write(lambda f: live_torch.save(snap, f)))
    timed("fsync", fsync)
    image = timed("arena snapshot", lambda: arena.take(state))
    # the CRC32s and digest leaves the copy did not take, the file written from the arena (O_DIRECT)
    timed("arena write", lambda: zipimage.write(image, *arena.image, Path(out) / "f.pt"))
    timed("arena fsync", fsync)
def steps(n, writer=None):
    times, thread = [], None
    def loop():
        _set_priority(threading.get_native_id(), STARVED_NICE)
        writer()
    for i in range(n):
        if writer is not None and (thread is None or not thread.is_alive()):
            thread = threading.Thread(target=loop); thread.start()
        s = time.perf_counter(); tr._step(*batches[i % 4]); times.append(time.perf_counter() - s)
    if thread is not None:
        thread.join()
    return statistics.median(times)
steps(3)
writers = {{
    "torch.save": lambda: write(lambda f: torch.save(snap, f)),
    "ours": lambda: write(lambda f: live_torch.save(snap, f)),
    "arena": lambda: zipimage.write(image, *arena.image, Path(out) / "f.pt"),
}}
ratios = {{k: [] for k in writers}}
for _ in range(rounds):  # each round: steps with no writer, then with each writer; ratios against that round
    alone = steps(8)
    for name, writer in writers.items():
        ratios[name].append(steps(8, writer) / alone - 1)
size = (Path(out) / "f.pt").stat().st_size
print({{"size": size, **{{k: tuple(statistics.median(x) for x in zip(*v)) for k, v in phases.items()}},
        **{{"slowdown " + k: (statistics.median(v), min(v), max(v)) for k, v in ratios.items()}}}})
"""


PHASES = (
    "state dict",
    "snapshot",
    "digest",
    "torch.save",
    "ours",
    "fsync",
    "arena snapshot",
    "arena write",
    "arena fsync",
)  # the breakdown child's names, in its order


def _result(proc: subprocess.CompletedProcess) -> dict:
    """The child's dict; a child that failed ends the bench with its error (not just its exit status)."""
    if proc.returncode:
        sys.exit(f"a measured run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return eval(proc.stdout.strip().splitlines()[-1], {"nan": float("nan")})  # our own child's dict literal


def breakdown(scale: str, img: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-c", BREAKDOWN.format(root=str(ROOT)), scale, str(img), tmp, str(rounds)],
            capture_output=True,
            text=True,
        )
    return _result(proc)


def print_breakdown(args) -> None:
    print(
        "one save, median of 5, ms of wall time (of the process's CPU, all its threads): before the arena "
        "(separate snapshot buffers, a digest pass, the file written by torch.save or by our writer, fsync) and now "
        "(the snapshot into the arena, hashed as it is copied, and the file written from the arena, fsync); then the "
        "training "
        "step's slowdown while a background thread (nice 19) keeps writing, against steps with no writer, median "
        f"(min-max) over {args.repeats} alternated rounds"
    )
    print(
        "| scale | MB | state dict | snapshot | digest | torch.save | ours | fsync | arena snapshot | arena write | "
        "arena fsync | steps slower: torch.save / ours / arena writing |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scale in args.scales.split(","):
        b = breakdown(scale, args.img_size, args.repeats)
        ms = " | ".join(f"{1000 * b[k][0]:.0f} ({1000 * b[k][1]:.0f})" for k in PHASES)
        slower = " / ".join(
            "{:+.0f} % ({:+.0f} to {:+.0f})".format(*(100 * x for x in b[f"slowdown {k}"]))
            for k in ("torch.save", "ours", "arena")
        )
        print(f"| {scale} | {b['size'] / 2**20:.0f} | {ms} | {slower} |", flush=True)


def run(scale: str, steps: int, every: int, mode: str, img: int, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), scale, str(steps), str(every), mode, str(img), str(out)],
        capture_output=True,
        text=True,
    )
    return _result(proc)


MODES = ("none", "sync", "async", "async-pass", "async-stream", "async-torch.save", "dcp")


def measure(scale: str, args) -> dict[str, dict]:
    """Every mode ``--repeats`` times, interleaved (the order rotates each round, so drift in the machine's speed
    falls on every mode alike); per mode the median total and the median stall over the rounds."""
    modes = args.modes
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                runs[mode].append(run(scale, args.steps, args.every, mode, args.img_size, Path(tmp) / f"{mode}{r}"))
    medians = {m: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for m, rs in runs.items()}
    # per round, paired with the same round's run without saves (drift between rounds cancels): the wall-time
    # overhead, and the cost of a save as a share of that round's training between two saves
    for m, rs in runs.items():
        pairs = list(zip(rs, runs["none"]))
        walls = [100 * (r["total_s"] / base["total_s"] - 1) for r, base in pairs]
        medians[m]["wall_overhead"] = (statistics.median(walls), min(walls), max(walls))
        costs = [r["excess_s"] / max(1, r["saves"]) for r in rs]
        medians[m]["rounds"] = {
            "stall": [r["stall_s"] for r in rs],
            "cost": costs,
            "overhead": [100 * c / (args.every * base["median_step_s"]) for c, (_, base) in zip(costs, pairs)],
        }
    return medians


def print_comparison(measured: list, args) -> None:
    """Every mode side by side, one row per scale (all modes measured)."""
    print(
        "| scale | s / step (no saves) | save MB | sync stall s | async stall s (first) | async / sync | "
        "overhead sync % | overhead async % | async cost / save s | at 1 save / 200 steps % | dcp.async_save "
        "stall s (first) | dcp / sync | overhead dcp % |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scale, m in measured:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="n,s")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every mode (medians are reported)")
    parser.add_argument("--breakdown", action="store_true", help="where one save's time goes (see above)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="which runs, comma-separated (none is always one: the baseline)"
    )
    args = parser.parse_args()
    args.modes = tuple(dict.fromkeys(["none", *args.modes.split(",")]))
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    if args.breakdown:
        print_breakdown(args)
        return 0
    print(
        f"{args.steps} steps, a save every {args.every}, {args.repeats} interleaved rounds, medians; cost of a save ="
        " its stall + the steps' slowdown while the writer runs (against the same run's steps with no writer); "
        "overhead = cost / training time between saves"
    )
    measured = [(scale, measure(scale, args)) for scale in args.scales.split(",")]
    if set(args.modes) == set(MODES):
        print_comparison(measured, args)
    print("\nper mode, median (min-max) over the rounds: stall per save (the first save's), cost per save, that cost")
    print("as % of the training between two saves (each round against its own run without saves), and the wall")
    print("time of the run against the same round's run without saves:")
    print("| scale | mode | s / step (no saves) | save MB | stall s | cost / save s | overhead % | wall % |")
    print("|---|---|---|---|---|---|---|---|")
    for scale, m in measured:
        per_step = m["none"]["median_step_s"]
        for mode in args.modes[1:]:
            r = m[mode]
            rounds, wall = r["rounds"], r["wall_overhead"]
            print(
                f"| {scale} | {mode} | {per_step:.3f} | {r['size'] / 2**20:.1f} | {spread(rounds['stall'], '.3f')} "
                f"(first {r['first_stall_s']:.3f}) | {spread(rounds['cost'], '.3f')} | "
                f"{spread(rounds['overhead'], '.1f')} | {wall[0]:+.1f} ({wall[1]:+.1f} to {wall[2]:+.1f}) |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
