"""One command for a CUDA machine: the GPU paths of fuse-train and ckpttools, as one table.

    python bench/cuda_check.py [--steps 300] [--out DIR]

Rows (each runs real fuse-train / ckpt processes on the demo data):

1. AMP bf16 training for --steps steps: loss finite and falling;
2. AMP fp16 with GradScaler for --steps steps: the same (the scaler's scale is reported);
3. interrupt + resume with deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG, torch.use_deterministic_algorithms):
   the largest difference of the final weights to an uninterrupted run (0 = bitwise);
4. async save stall with pinned memory against a synchronous save of the same state;
5. a checkpoint saved on cuda, `ckpt remap --device cpu`, then loaded with plain torch.load in a process that
   sees no GPU (CUDA_VISIBLE_DEVICES="");
6. torchrun --nproc_per_node=N with NCCL when N >= 2 GPUs are visible: a run that finishes, and its checkpoint
   verifies;
7. a NCCL process group of one rank on one GPU: the collectives fuse-train's loop uses (stop/save flags,
   gathered objects, rank 0's buffers, barrier) on CUDA tensors;
8. ``--save-format dcp`` on CUDA: DCP's async save staged through pinned memory, the folder verifies, a
   resume from it finishes;
9. SIGTERM to the process group of a run training on the GPU (DataLoader workers, a save every 2 steps):
   seconds to the published last.pt and to exit (exit 143, the file verifies), scales n and s.

It runs to the end on a CPU-only machine too: the CUDA rows are skipped with the reason, row 3 runs on CPU
(where it must be bitwise) and row 4 measures the CPU copy path, so the script itself is tested here.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchlib import scratch_folder

ROOT = Path(__file__).resolve().parent.parent


def _train(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    return subprocess.run(  # --no-plots: the checks read checkpoints and logs, not figures
        [sys.executable, "-m", "fuse_train", *args, "--no-plots"],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _load(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _losses(run: Path) -> list[float]:
    import csv

    with open(run / "results.csv") as f:
        return [float(r["train/cls_loss"]) + float(r["train/box_loss"]) for r in csv.DictReader(f)]


def row_amp(dtype: str, steps: int, work: Path, cuda: bool) -> tuple[str, str]:
    if not cuda:
        return "skipped", "no CUDA device: AMP runs only on CUDA (on CPU fuse-train trains in fp32)"
    import torch

    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        return "skipped", "this GPU has no bf16"
    epochs = max(2, steps // 20)  # demo data at batch 16: 20 steps an epoch
    env = {"FUSE_TRAIN_FORCE_FP16": "1"} if dtype == "fp16" else {}
    proc = _train(["--epochs", str(epochs), "--device", "0", "--name", f"amp_{dtype}"], work, env)
    if proc.returncode != 0:
        return "FAILED", proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    losses = _losses(work / "runs" / "fuse" / f"amp_{dtype}")
    ckpt = _load(work / "runs" / "fuse" / f"amp_{dtype}" / "weights" / "last.pt")
    scale = ckpt.get("scaler", {}).get("scale") if dtype == "fp16" else None
    ok = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    return ("ok" if ok else "FAILED"), (
        f"{epochs * 20} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        + (f", GradScaler scale {scale}" if scale is not None else "")
    )


def row_resume(work: Path, cuda: bool, img_size: int) -> tuple[str, str]:
    device = "0" if cuda else "cpu"
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "FUSE_TRAIN_DETERMINISTIC": "1"}
    base = ["--epochs", "2", "--device", device, "--workers", "0", "--img-size", str(img_size)]
    full = _train([*base, "--name", "full"], work, env)
    cut = _train([*base, "--name", "cut"], work, {**env, "FUSE_TRAIN_STOP_AFTER_STEP": "27"})
    last = work / "runs" / "fuse" / "cut" / "weights" / "last.pt"
    resumed = _train(["--resume", str(last)], work, env)
    if full.returncode or cut.returncode != 130 or resumed.returncode:
        return "FAILED", f"exits {full.returncode} / {cut.returncode} / {resumed.returncode}"
    a, b = _load(work / "runs" / "fuse" / "full" / "weights" / "last.pt"), _load(last)
    worst = max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"])
    where = "CUDA, deterministic algorithms" if cuda else "CPU"
    return (
        "ok" if cuda or worst == 0 else "FAILED"
    ), f"{where}: max |weight difference| {worst:.3g} after Ctrl-C at step 27 and resume"


def row_async(work: Path, cuda: bool) -> tuple[str, str]:
    code = r"""
import sys, time, torch
sys.path.insert(0, %r)
from pathlib import Path
from ckpttools.formats import zipimage
from fuse_train.checkpoint.async_save import AsyncSaver, PinnedSnapshot
dev = "cuda" if torch.cuda.is_available() else "cpu"
state = {"model": {f"w{i}": torch.randn(4 << 20, device=dev) for i in range(16)}}  # 256 MiB of float32
snapshot = PinnedSnapshot(file_image=True)  # as fuse-train's .pt saves: the pinned arena, written from it
saver, path = AsyncSaver(snapshot), %r
def write(snap):
    assert zipimage.write(snap, *snapshot.image, Path(path))
t = time.perf_counter()
torch.save({"model": {k: v.cpu() for k, v in state["model"].items()}}, path)
sync = time.perf_counter() - t
saver.submit(state, write); saver.wait()  # first use allocates the pinned buffers
t = time.perf_counter(); saver.submit(state, write); stall = time.perf_counter() - t; saver.wait()
print(sync, stall, dev)
""" % (str(ROOT), str(work / "async.pt"))  # noqa: UP031 (the code's own braces)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        return "FAILED", out.stderr.strip().splitlines()[-1]
    sync, stall, dev = out.stdout.split()
    sync, stall = float(sync), float(stall)
    how = (
        "non_blocking copies into the pinned arena, written from it"
        if dev == "cuda"
        else "copies into the arena (no GPU: pinned path not exercised)"
    )
    return "ok", f"256 MiB state: sync save {sync:.3f} s, async stall {stall:.3f} s ({stall / sync:.2f} x), {how}"


def row_remap(work: Path, cuda: bool) -> tuple[str, str]:
    if not cuda:
        return "skipped", "no CUDA device to save on (tests/test_remap.py covers a cuda:1 location written by hand)"
    proc = _train(["--epochs", "1", "--device", "0", "--name", "oncuda"], work)
    last = work / "runs" / "fuse" / "oncuda" / "weights" / "last.pt"
    out = work / "cpu.pt"
    remap = subprocess.run(
        [sys.executable, "-m", "ckpttools.cli", "remap", str(last), "--device", "cpu", "-o", str(out), "--force"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    load = subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(out)!r}, weights_only=True); print('ok')"],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    ok = proc.returncode == 0 and remap.returncode == 0 and load.stdout.strip() == "ok"
    return ("ok" if ok else "FAILED"), "saved on cuda:0, remapped, loaded by plain torch.load with no GPU visible"


def row_nccl(work: Path, cuda: bool) -> tuple[str, str]:
    import torch

    n = torch.cuda.device_count() if cuda else 0
    if n < 2:
        return (
            "skipped",
            f"{n} GPU(s) visible: NCCL DDP needs 2 or more (gloo DDP is tested on CPU in tests/test_remap.py)",
        )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={n}",
            "-m",
            "fuse_train",
            "--epochs",
            "2",
            "--batch",
            str(8 * n),
            "--name",
            "nccl",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
        timeout=1800,
    )
    verify = subprocess.run(
        [sys.executable, "-m", "ckpttools.cli", "verify", str(work / "runs" / "fuse" / "nccl" / "weights" / "last.pt")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    return ("ok" if run.returncode == 0 and verify.returncode == 0 else "FAILED"), f"torchrun on {n} GPUs (NCCL)"


NCCL_ONE_RANK = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, %r)
from fuse_train.process.distributed import DistInfo, any_rank_flags, barrier, rank0_copies
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1)
dev = torch.device("cuda:0")
as_ddp = DistInfo(rank=0, world_size=2)  # 'enabled': the helpers take their collective paths (on a group of 1)
flags = any_rank_flags([True, False], as_ddp, dev)
copies = rank0_copies({"bn.running_mean": torch.arange(4.0, device=dev)}, as_ddp)
barrier(as_ddp)
gathered = [None]
dist.all_gather_object(gathered, {"step": 3})
print(dist.get_backend(), flags, copies["bn.running_mean"].tolist(), gathered[0])
dist.destroy_process_group()
"""


def row_nccl_one_rank(work: Path, cuda: bool) -> tuple[str, str]:
    if not cuda:
        return "skipped", "no CUDA device"
    out = subprocess.run([sys.executable, "-c", NCCL_ONE_RANK % str(ROOT)], capture_output=True, text=True, timeout=300)
    if out.returncode:
        return "FAILED", (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
    return "ok", "NCCL group of 1 rank: all_reduce, broadcast, barrier, all_gather_object -> " + out.stdout.strip()


def row_dcp_cuda(work: Path, cuda: bool) -> tuple[str, str]:
    if not cuda:
        return "skipped", "no CUDA device (DCP saves are tested on CPU with gloo)"
    base = ["--device", "0", "--save-format", "dcp", "--save-every", "10", "--name", "dcpcuda"]
    cut = _train(["--epochs", "2", *base], work, {"FUSE_TRAIN_STOP_AFTER_STEP": "30"})
    last = work / "runs" / "fuse" / "dcpcuda" / "weights" / "last.dcp"
    verify = subprocess.run(
        [sys.executable, "-m", "ckpttools.cli", "verify", str(last)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    resumed = _train(["--resume", str(last)], work)
    ok = cut.returncode == 130 and verify.returncode == 0 and resumed.returncode == 0
    return ("ok" if ok else "FAILED"), (
        f"stopped at step 30 (exit {cut.returncode}), last.dcp verify exit "
        f"{verify.returncode}, resume exit {resumed.returncode}"
    )


def row_preempt(work: Path, cuda: bool) -> tuple[str, str]:
    if not cuda:
        return "skipped", "no CUDA device (bench/preempt_bench.py measures CPU and torchrun)"
    sys.path.insert(0, str(ROOT / "bench"))
    from preempt_bench import measure

    rows = measure(["n", "s"], 1, 3, "0", 640, work)
    ok = all(r["ok"] for r in rows)
    detail = "; ".join(
        f"{r['scale']}: epoch {r['epoch']} s, to last.pt {r['published']} s, to exit {r['exited']} s" for r in rows
    )
    return ("ok" if ok else "FAILED"), "640 px, batch 8, median (range) of 3: " + detail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--img-size", type=int, default=128, help="input size of the resume check (64: quicker)")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    work = scratch_folder(args.out, "cuda-check-")
    device = torch.cuda.get_device_name(0) if cuda else "no CUDA device (CPU only)"
    print(f"cuda_check on {device}, torch {torch.__version__}\n")
    rows = [
        ("AMP bf16 training", lambda: row_amp("bf16", args.steps, work, cuda)),
        ("AMP fp16 + GradScaler", lambda: row_amp("fp16", args.steps, work, cuda)),
        ("interrupt + resume, deterministic", lambda: row_resume(work, cuda, args.img_size)),
        ("async save stall", lambda: row_async(work, cuda)),
        ("cuda checkpoint -> remap --device cpu -> CPU load", lambda: row_remap(work, cuda)),
        ("torchrun + NCCL", lambda: row_nccl(work, cuda)),
        ("NCCL process group, 1 GPU", lambda: row_nccl_one_rank(work, cuda)),
        ("--save-format dcp on CUDA", lambda: row_dcp_cuda(work, cuda)),
        ("SIGTERM to the process group on CUDA", lambda: row_preempt(work, cuda)),
    ]
    print("| check | result | detail | s |")
    print("|---|---|---|---|")
    failed = False
    for name, run in rows:
        t0 = time.perf_counter()
        status, detail = run()
        failed |= status == "FAILED"
        print(f"| {name} | {status} | {detail} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
