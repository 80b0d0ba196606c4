"""How long a preemption takes: from SIGTERM to the whole process group until ``last.pt`` is published and the
job has exited, with a background save in flight.

    python bench/preempt_bench.py [--scales n,s] [--nproc 2] [--repeats 5] [--device cpu] [--img-size 128]

Each repeat starts ``fuse-train`` (under ``torchrun --nproc_per_node N`` when N > 1) in a process group of its
own on the demo data, saving every 2 steps so that a background save is usually being written, waits until
the first epoch is done plus a random moment, then sends SIGTERM to the group as Slurm, ``timeout(1)`` and
Kubernetes do.  Reported per scale: the step time (from the run's own epoch time), the seconds from the signal
to the new ``last.pt`` being in place and to the job's exit (median and range), and whether every stop
exited 143 (plain run; torchrun itself exits 1 when signalled) with a ``last.pt`` that verifies.  torchrun's
grace before SIGKILL is 30 s, Kubernetes' default ``terminationGracePeriodSeconds`` is 30 s: the stop must fit
inside.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import scratch_folder

ROOT = Path(__file__).resolve().parent.parent


def _command(scale: str, nproc: int, device: str, img_size: int, name: str) -> list[str]:
    train = [
        "--data",
        "demo",
        "--scale",
        scale,
        "--epochs",
        "50",
        "--batch",
        str(8 * nproc),
        "--device",
        device,
        "--img-size",
        str(img_size),
        "--save-every",
        "2",
        "--name",
        name,
    ]
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "fuse_train",
            *train,
        ]
    return [sys.executable, "-m", "fuse_train", *train]


def stop_once(scale: str, nproc: int, device: str, img_size: int, work: Path, name: str, rng: random.Random) -> dict:
    """One run stopped by SIGTERM to its process group; seconds to published last.pt and to exit."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)),
    }
    proc = subprocess.Popen(
        _command(scale, nproc, device, img_size, name),
        cwd=work,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:  # the first epoch's line: saves have been happening for a while
        lines.append(line)
        if line.startswith("epoch 1/"):
            break
    last = work / "runs" / "fuse" / name / "weights" / "last.pt"
    time.sleep(rng.uniform(0.2, 1.5))
    before = last.stat().st_mtime_ns if last.exists() else 0
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    published, seen = None, before  # the *last* replacement of last.pt: a save in flight may land first
    while proc.poll() is None:
        mtime = last.stat().st_mtime_ns if last.exists() else 0
        if mtime != seen:
            published, seen = time.time() - t0, mtime
        time.sleep(0.005)
    exited = time.time() - t0
    rest = proc.stdout.read()
    if last.exists() and last.stat().st_mtime_ns != seen:
        published = exited
    verify = subprocess.run(
        [sys.executable, "-m", "ckpttools.cli", "verify", str(last)], capture_output=True, text=True, env=env
    )
    epoch_seconds = _epoch_seconds(work / "runs" / "fuse" / name)
    return {
        "code": proc.returncode,
        "published": published,
        "exited": exited,
        "verified": verify.returncode == 0,
        "epoch_seconds": epoch_seconds,
        "log": "".join(lines) + rest,
    }


def _epoch_seconds(run: Path) -> float | None:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    if "time/epoch_seconds" not in ea.Tags()["scalars"]:
        return None
    return ea.Scalars("time/epoch_seconds")[0].value


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _stopped_well(stop: dict, nproc: int) -> bool:
    """The ranks saved and said so, last.pt verifies; exit 143 for a plain run.  torchrun's own exit code is
    1 when it is signalled itself (it raises SignalException after stopping its workers), so under torchrun
    the workers' line is what counts."""
    saved = "interrupted by SIGTERM: saved" in stop["log"] and stop["verified"]
    return saved and (nproc > 1 or stop["code"] == 143)


def measure(scales: list[str], nproc: int, repeats: int, device: str, img_size: int, work: Path) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for scale in scales:
        stops = [stop_once(scale, nproc, device, img_size, work, f"{scale}{nproc}_{i}", rng) for i in range(repeats)]
        ok = all(_stopped_well(s, nproc) for s in stops)
        rows.append(
            {
                "scale": scale,
                "nproc": nproc,
                "device": device,
                "ok": ok,
                "stops": stops,
                "published": spread([s["published"] for s in stops]),
                "exited": spread([s["exited"] for s in stops]),
                "epoch": spread([s["epoch_seconds"] for s in stops]),
            }
        )
        if not ok:
            bad = next(s for s in stops if not _stopped_well(s, nproc))
            print(
                f"scale {scale}: exit {bad['code']}, verified {bad['verified']}\n{bad['log'][-2000:]}", file=sys.stderr
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="n,s")
    parser.add_argument("--nproc", type=int, default=2, help="processes (torchrun --nproc_per_node) per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--img-size", type=int, default=128)
    args = parser.parse_args()
    work = scratch_folder(None, "preempt-bench-")
    rows = measure(args.scales.split(","), args.nproc, args.repeats, args.device, args.img_size, work)
    print(
        f"SIGTERM to the process group, {args.nproc} process(es), {args.device}, demo data at "
        f"{args.img_size} px, batch {8 * args.nproc}, a save every 2 steps; median (range) of {args.repeats}\n"
    )
    print("| scale | epoch s | signal -> last.pt published, s | signal -> exit, s | saved + verifies |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scale']} | {r['epoch']} | {r['published']} | {r['exited']} | {'yes' if r['ok'] else 'NO'} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
