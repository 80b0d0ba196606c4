"""torch.distributed set-up for torchrun: NCCL on CUDA, gloo on CPU.  A plain launch is world size 1."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    store: Any = field(default=None, repr=False, compare=False)  # this attempt's own store (_attempt_store)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launch_rank() -> int:
    """This process's rank as torchrun's environment gives it, readable before the group is joined (0 for a
    plain launch, whatever RANK says)."""
    return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = launch_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(rank, world, local_rank)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    store = _attempt_store(world, rank)
    own_store = {} if store is None else {"store": store, "rank": rank, "world_size": world}
    dist.init_process_group("nccl" if use_cuda else "gloo", **own_store)
    return DistInfo(rank, world, local_rank, store)


def _attempt_store(world: int, rank: int):
    """Under torchrun: a store of this attempt's own, hosted by rank 0's worker on MASTER_PORT + 1.

    torch's env rendezvous puts the process group's keys in the torchrun agent's store without a per-attempt
    prefix ("a new TCPStore for every retry"), but the agents keep their store across ``--max-restarts``
    restarts (same MASTER_PORT).  A restarted rank that reaches ``init_process_group`` before rank 0 then reads
    the *previous* attempt's addresses and fails ("Gloo connectFullMesh failed ... Connection refused"), so
    every restart fails again.  A restart counter is no way out: with several agents only some count a restart.
    A store created by this attempt's rank 0 process exists only as long as that process: it holds no key of an
    earlier attempt.  MASTER_ADDR is the host of rank 0 (group rank 0's node)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]) + 1,
        world,
        is_master=rank == 0,
        timeout=dist.constants.default_pg_timeout,
        wait_for_workers=False,
    )


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: DistInfo, device) -> bool:
    """True if the flag is set on any rank (used so every rank stops at the same step)."""
    return any_rank_flags([flag], info, device)[0]


def any_rank_flags(flags: list[bool], info: DistInfo, device) -> list[bool]:
    """``any_rank`` of several flags in one collective (the loop asks every step: stop? save now?)."""
    if not info.enabled:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
    return t


def rank0_copies(tensors: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """Copies of ``tensors`` holding rank 0's values on every rank (the live tensors are not touched)."""
    if not info.enabled:
        return tensors
    copies = {k: t.detach().clone() for k, t in tensors.items()}
    for t in copies.values():
        dist.broadcast(t, src=0)
    return copies


CLOSE_WAIT = timedelta(seconds=10)


def shutdown(info: DistInfo) -> None:
    """Leave the process group.  Where rank 0's process hosts this attempt's store, it stays up until every other
    rank has closed its group: a rank still using the store while its host exits can abort ("terminate called
    without an active exception", seen under the test suite).  Never blocks past ``CLOSE_WAIT`` (a rank may be gone)."""
    if not (info.enabled and dist.is_initialized()):
        return
    dist.destroy_process_group()
    if info.store is None:
        return
    try:
        if info.rank == 0:
            info.store.wait([f"fuse_train/closed/{r}" for r in range(1, info.world_size)], CLOSE_WAIT)
        else:
            info.store.set(f"fuse_train/closed/{info.rank}", "1")
    except Exception:  # noqa: BLE001 - a rank that died or a host already gone: nothing left to wait for
        pass
