"""Training state that is not a module: EMA, LR schedule, sampler, RNG capture, and the checkpoint dict.

Pieces with state to restore have ``state_dict()`` / ``load_state_dict()``; the EMA is saved as its weights
and update count (``K_EMA``, ``K_UPDATES``) and the LR schedule is rebuilt from the run record (a pure
function of the step; its ``state_dict()`` is saved only to document what was in force).  The checkpoint keys
come from ``ckpttools.trainers.fuse_train_schema`` and are documented in docs/checkpoint-format.md.  Everything
stored is a tensor, a number, a string, or a list / tuple / dict of those, so ``torch.load(weights_only=True)``
reads it.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

# the checkpoint schema (format name, version, every top-level key) has one definition, shared with ckpttools
from ckpttools.trainers.base import now as now_iso  # noqa: F401 - the history's timestamps, one definition
from ckpttools.trainers.fuse_train_schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    K_BEST_FITNESS,
    K_DATE,
    K_EMA,
    K_EPOCH,
    K_FORMAT,
    K_HISTORY,
    K_METRICS,
    K_MODEL,
    K_MODEL_CONFIG,
    K_OPTIMIZER,
    K_PROGRESS,
    K_RESOLVED,
    K_RESULTS,
    K_RNG,
    K_SCALER,
    K_SCHEDULER,
    K_TRAIN_ARGS,
    K_UPDATES,
    K_VERSION,
    K_VERSIONS,
)


class ModelEMA:
    """Exponential moving average of a model's weights (and buffers), decay ramped up as in Ultralytics."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        source = model.state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[name].detach(), alpha=1 - d)
            else:
                value.copy_(source[name])


@dataclass(frozen=True)
class Segment:
    """Where the run's current steps-per-epoch began: ``epoch`` and ``global_step`` at that epoch's virtual start,
    and the samples seen by then.  A run that never changed its batch size or data has one segment, (0, 0, 0);
    an allowed change of either starts a new one at the resume.  The one definition of where a run stands:

        global_step  == segment.global_step + (epoch - segment.epoch) * steps_per_epoch + step_in_epoch
        samples_seen == segment.samples_seen + (global_step - segment.global_step) * batch

    ``ckpt verify`` checks the first (ckpttools.trainers.fuse_train.check_counters)."""

    epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "global_step": self.global_step, "samples_seen": self.samples_seen}

    @classmethod
    def from_progress(cls, progress: dict) -> Segment:
        s = progress.get("segment") or {}
        return cls(int(s.get("epoch", 0)), int(s.get("global_step", 0)), int(s.get("samples_seen", 0)))


def continue_with(progress: dict, old_batch: int, new_batch: int, steps_per_epoch: int) -> tuple[int, Segment]:
    """(step in epoch, new segment) for a resume whose steps per epoch changed (another batch size or dataset).

    The data position carries over by samples: the epoch continues at the first batch of the new size that
    starts at or before the samples already taken this epoch (at most ``new_batch - 1`` of them are seen again).
    The segment is anchored so the counters stay one consistent position."""
    epoch, step_old, global_step = int(progress["epoch"]), int(progress["step_in_epoch"]), int(progress["global_step"])
    step = min((step_old * old_batch) // new_batch, steps_per_epoch)
    samples = int(progress.get("samples_seen", global_step * old_batch))
    return step, Segment(epoch, global_step - step, samples - step * new_batch)


def schedule_step(epoch: int, step_in_epoch: int, steps_per_epoch: int) -> int:
    """The step the learning-rate schedule is evaluated at: the epoch position in steps of the current size.
    The global step itself for a run that never changed its batch size; after a change, the point of the
    schedule the run has reached in epochs."""
    return epoch * steps_per_epoch + step_in_epoch


class LRSchedule:
    """Linear warmup (lr from 0, momentum from 0.8), then cosine or linear decay from lr0 to lr0*lrf.

    A pure function of the global step, so its only state is the configuration it was built with: a resume
    rebuilds it from the (possibly allowed-changed) run record instead of loading it."""

    def __init__(self, lr0: float, lrf: float, momentum: float, warmup_steps: int, total_steps: int, kind: str):
        self.lr0, self.lrf, self.momentum = lr0, lrf, momentum
        self.warmup_steps, self.total_steps, self.kind = warmup_steps, max(1, total_steps), kind

    def factor(self, step: int) -> float:
        x = min(step / self.total_steps, 1.0)
        if self.kind == "cosine":
            return self.lrf + (1 - self.lrf) * (1 + math.cos(math.pi * x)) / 2
        return 1 - x * (1 - self.lrf)

    def lr(self, step: int) -> float:
        lr = self.lr0 * self.factor(step)
        if step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr

    def momentum_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.8 + (self.momentum - 0.8) * (step + 1) / self.warmup_steps
        return self.momentum

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr, momentum = self.lr(step), self.momentum_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            elif "momentum" in group:
                group["momentum"] = momentum
        return lr

    def state_dict(self) -> dict:
        return {
            "lr0": self.lr0,
            "lrf": self.lrf,
            "momentum": self.momentum,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "kind": self.kind,
        }


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled global batches, split over ranks, resumable at any step.

    Global batch k of epoch e is ``perm_e[k*B:(k+1)*B]``; rank r takes its contiguous slice of it.  The
    permutation depends only on (seed, epoch), so the data position is world-size independent: a global
    step count.  Yields lists of ``(epoch, index)`` keys so workers need no epoch state.  The last
    incomplete global batch is dropped (every rank must take a step).
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if global_batch % world_size:
            raise ValueError(f"--batch {global_batch} is not divisible by the world size {world_size}")
        self.n, self.global_batch, self.seed, self.shuffle = n, global_batch, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n // self.global_batch) if self.n >= self.global_batch else 1

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        order, per_rank = self.order(), self.global_batch // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.global_batch : (step + 1) * self.global_batch]
            if len(batch) < self.global_batch:  # dataset smaller than one batch: split what there is
                per_rank = max(1, len(batch) // self.world_size)
            mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
            yield [(self.epoch, i) for i in mine]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step


def rank_loss_sum(saved: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's running loss sums from a checkpoint's per-rank ``[world_size, 2]`` table.

    On the world size it was saved with, each rank takes its own row (exact).  After ``ckpt remap`` the table
    has one row per new rank holding the old total in row 0, so the epoch's mean loss is still right."""
    saved = saved.to(torch.float64).reshape(-1, 2)
    if saved.shape[0] == world_size:
        return saved[rank].clone()
    return saved.sum(0) if rank == 0 else torch.zeros(2, dtype=torch.float64)


def capture_rng() -> dict:
    """This process's RNG states, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
