"""Write a DCP folder as M ranks would, through torch.distributed.checkpoint on local gloo processes.

``ckpt convert one.pt DIR --to dcp --world-size M`` starts M CPU processes; each turns every tensor whose
first dimension allows it into a DTensor sharded along dim 0 over a 1-D mesh of M ranks (the layout FSDP2
writes), everything else replicated, and calls ``dcp.save`` collectively.  The result has one ``.distcp``
file per rank and metadata with each tensor's chunks; ``dcp_to_torch_save`` and any world size read it back.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path


def _shard(x, mesh, world: int):
    import torch
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if isinstance(x, torch.Tensor):
        placement = Shard(0) if x.dim() and x.shape[0] >= world else Replicate()
        return distribute_tensor(x, mesh, [placement])
    if isinstance(x, dict):
        return {k: _shard(v, mesh, world) for k, v in x.items()}
    if isinstance(x, list):
        return [_shard(v, mesh, world) for v in x]
    return x


def _worker(rank: int, world: int, store: str, src: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)  # written by us, tensors only
        dcp.save(_shard(state, mesh, world), storage_writer=dcp.FileSystemWriter(out))
    finally:
        dist.destroy_process_group()


def save_sharded(plain_pt: Path, out: Path, world: int) -> None:
    """``plain_pt``: a torch zip holding only weights_only-loadable values."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_worker, args=(world, store, str(plain_pt), str(out)), nprocs=world, join=True)
