"""``torch.distributed.checkpoint`` folders, read without torch.distributed and without running pickles.

A DCP folder holds ``.metadata`` (a pickle of DCP's dataclasses: which fully-qualified names exist, their
dtype, size and chunks, and where each item's bytes are) and ``*.distcp`` files.  Each item is a small
``torch.save`` zip embedded at an offset in a ``.distcp`` file; each is read and checked like any other
torch zip.  Tensors saved as one chunk become one tensor; sharded tensors list their chunks.
"""

from __future__ import annotations

import ctypes
import os
import signal
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ckpttools.atomic import atomic_folder, temp_path
from ckpttools.digest import refresh_digest
from ckpttools.errors import UsageError
from ckpttools.formats import torchzip
from ckpttools.formats.base import CHUNK, Checkpoint, WriteRequest, refuse_unwritable, to_plain_tree
from ckpttools.formats.confine import inside
from ckpttools.objects import Placeholder
from ckpttools.report import ERROR, WARNING, Finding
from ckpttools.tensors import LazyTensor, StorageRef, contiguous_strides, tensor_bytes
from ckpttools.trees import materialise

NAME = "dcp"


def _state(obj: Any) -> dict:
    return obj.state if isinstance(obj, Placeholder) and isinstance(obj.state, dict) else {}


def _kind(obj: Any) -> str:
    return obj._reference.name if isinstance(obj, Placeholder) else type(obj).__name__


def detect(path: Path, head: bytes) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def read(path: Path) -> Checkpoint:
    """The folder as one tree: ``.metadata`` (scanned and read by our unpickler, never torch's) says where every
    item's embedded torch zip is; each is read and checked like any other torch zip."""
    ckpt = Checkpoint(path, NAME)
    metadata = ckpt.read_pickle((path / ".metadata").read_bytes(), ".metadata")
    if metadata is None:
        ckpt.findings.append(Finding(ERROR, "dcp.metadata-unreadable", ".metadata cannot be read", ".metadata"))
        return ckpt
    meta = _state(metadata)
    fqns = meta.get("state_dict_metadata") or {}
    storage = meta.get("storage_data") or {}
    planner = meta.get("planner_data") or {}
    items: dict[str, list[tuple[tuple, Any]]] = {}
    owners: dict[int, Any] = {}  # storage -> the embedded zip it lives in
    for index, info in storage.items():
        idx, where = _state(index), _state(info)
        fqn = idx.get("fqn")
        relative = str(where.get("relative_path", ""))
        file = inside(path, relative)
        if file is None:  # never read: the finding is the answer
            ckpt.findings.append(
                Finding(
                    ERROR,
                    "dcp.path-outside",
                    f"{fqn}: .metadata sends its data to {relative!r}, outside the folder; not read",
                    str(fqn),
                )
            )
            continue
        if not file.is_file():
            ckpt.findings.append(
                Finding(ERROR, "dcp.file-missing", f"{fqn}: data file {file.name} is missing", str(fqn))
            )
            continue
        offset, length = int(where.get("offset", 0)), int(where.get("length", 0))
        if offset + length > file.stat().st_size:
            ckpt.findings.append(
                Finding(
                    ERROR,
                    "dcp.truncated",
                    f"{fqn}: bytes {offset}..{offset + length} run past the end of {file.name}",
                    str(fqn),
                )
            )
            continue
        sub = torchzip.open_embedded(file, offset, length)
        for f in sub.findings:
            ckpt.findings.append(Finding(f.severity, f.code, f.message, f"{fqn} ({file.name}@{offset})"))
        ckpt.scans.extend((f"{fqn} ({file.name}@{offset}): {where}", scan) for where, scan in sub.scans)
        for key, ref in sub.storages.items():
            ckpt.storages[f"{file.name}@{offset}:{key}"] = ref
            owners[id(ref)] = sub
        items.setdefault(fqn, []).append((tuple(idx.get("offset") or ()), sub.tree))
        ckpt.records.update({f"{file.name}@{offset}/{n}": r for n, r in sub.records.items()})
    tree: dict[str, Any] = {}
    for fqn, md in fqns.items():
        value = _assemble(fqn, md, items.get(fqn, []), ckpt, owners)
        keys = planner.get(fqn) if isinstance(planner.get(fqn), (list, tuple)) and planner.get(fqn) else [fqn]
        _set_element(tree, list(keys), value)
    ckpt.tree = tree
    ckpt.iter_storage = lambda ref, chunk: owners[id(ref)].storage_chunks(ref, chunk) if id(ref) in owners else iter(())
    ckpt.record_of = lambda ref: owners[id(ref)].record_of(ref) if id(ref) in owners else None
    if not ckpt.storages:
        ckpt.findings.append(Finding(WARNING, "dcp.empty", "the folder holds no tensors", str(ckpt.path)))
    return ckpt


def _set_element(root: dict, path: list, value: Any) -> None:
    """Put ``value`` at ``path`` as DCP's own unflattening does: an int in the path is a list index (lists are
    flattened element by element), anything else a dict key (as a string)."""
    node: Any = root
    for i, key in enumerate(path):
        key = key if isinstance(key, int) else str(key)
        if i == len(path) - 1:
            child = value
        else:
            child = _get(node, key)
            if child is None:
                child = [] if isinstance(path[i + 1], int) else {}
        if isinstance(node, list) and isinstance(key, int):
            node.extend([None] * (key + 1 - len(node)))
            node[key] = child
        elif isinstance(node, dict):
            node[str(key)] = child
        node = child


def _get(node: Any, key) -> Any:
    if isinstance(node, list) and isinstance(key, int):
        return node[key] if key < len(node) else None
    return node.get(str(key)) if isinstance(node, dict) else None


def as_dcp_returns(tree: Any) -> Any:
    """The tree as a DCP folder gives it back: dict keys as strings, empty dicts gone (DCP stores none)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            v = as_dcp_returns(v)
            if not (isinstance(v, dict) and not v):
                out[str(k)] = v
        return out
    if isinstance(tree, list):
        return [as_dcp_returns(v) for v in tree]
    return tree


class _Assembled:
    """The bytes of a tensor DCP stored in chunks (one per rank), assembled in C order as they are read: chunks
    along dim 0 are streamed one after the other; any other chunking is put together in one array."""

    def __init__(self, size: tuple, parts: list[tuple[tuple, LazyTensor]], owners: dict):
        self.size, self.parts, self.owners = size, sorted(parts, key=lambda p: p[0]), owners

    def _part_bytes(self, t: LazyTensor, chunk: int):
        return tensor_bytes(t, self.owners[id(t.storage)].storage_chunks(t.storage, chunk))

    def storage_chunks(self, ref: StorageRef, chunk: int):
        along_dim0 = all(tuple(t.shape[1:]) == self.size[1:] and not any(off[1:]) for off, t in self.parts)
        if along_dim0:
            for _, t in self.parts:
                yield from self._part_bytes(t, chunk)
            return
        full = np.zeros(self.size, dtype=ref.dtype.info.bits)
        for off, t in self.parts:
            piece = np.frombuffer(b"".join(self._part_bytes(t, chunk)), dtype=full.dtype).reshape(t.shape)
            full[tuple(slice(o, o + n) for o, n in zip(off, t.shape))] = piece
        yield full.tobytes()

    def record_of(self, ref: StorageRef):
        return None  # no single zip record: each chunk's own record is checked


def _assemble(fqn: str, md: Any, chunks: list[tuple[tuple, Any]], ckpt, owners: dict) -> Any:
    if not chunks:
        ckpt.findings.append(
            Finding(ERROR, "dcp.item-missing", f"{fqn} is in .metadata but none of its data was found", fqn)
        )
        return None
    if _kind(md) != "TensorStorageMetadata":
        return chunks[0][1]
    size = tuple(_state(md).get("size") or ())
    numel = 1
    for s in size:
        numel *= s
    tensors = [(off, t) for off, t in chunks if isinstance(t, LazyTensor)]
    covered = sum(t.numel for _, t in tensors)
    if covered != numel:
        ckpt.findings.append(
            Finding(ERROR, "dcp.chunks-incomplete", f"{fqn}: chunks hold {covered} of {numel} elements", fqn)
        )
    if len(tensors) == 1 and tuple(tensors[0][1].shape) == size:
        return tensors[0][1]
    if covered != numel or not tensors:
        return {f"chunk@{list(off)}": t for off, t in sorted(tensors)}
    dtype = tensors[0][1].dtype
    ref = StorageRef(f"{fqn} (assembled from {len(tensors)} chunks)", dtype, numel, tensors[0][1].storage.location)
    owners[id(ref)] = _Assembled(size, tensors, owners)
    ref.reader = lambda r: b"".join(owners[id(r)].storage_chunks(r, CHUNK))
    return LazyTensor(ref, 0, size, contiguous_strides(size))


# ---- writing -----------------------------------------------------------------------------------------------------
# Through torch.distributed.checkpoint itself: one process (``no_dist``), or M local gloo processes that write
# it as M ranks do -- each turns every tensor whose first dimension allows it into a DTensor sharded along
# dim 0 over a 1-D mesh (the layout FSDP2 writes), everything else replicated, and calls ``dcp.save``
# collectively.  One ``.distcp`` file per rank; DCP reshards at load time, so any world size reads it.


def notes_for(tree: Any) -> list[str]:
    """What DCP will not carry exactly, said before writing."""
    notes = []
    if _any_dict(tree, lambda d: any(not isinstance(k, str) for k in d)):
        notes.append(
            "DCP keys are strings: non-string dict keys (e.g. optimizer state indices) come back as "
            "strings from a DCP folder (torch's flattening)"
        )
    if _any_dict(tree, lambda d: not d):
        notes.append("DCP does not store empty dicts: they are absent when read back (e.g. an unused GradScaler)")
    return notes


def _any_dict(tree: Any, test: Callable[[dict], bool]) -> bool:
    if isinstance(tree, dict):
        return test(tree) or any(_any_dict(v, test) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_any_dict(v, test) for v in tree)
    return False


def writable(t: Any) -> bool:
    """Whether torch's DCP planner can size this tensor's dtype (it asks torch.iinfo of every non-float dtype,
    which fails for the bit containers, float4 and e8m0): asked of torch itself, so the answer follows it."""
    import torch

    if not isinstance(t, LazyTensor):
        return False
    try:
        torch._utils._element_size(getattr(torch, str(t.dtype)))
    except (TypeError, AttributeError, RuntimeError):
        return False
    return True


def write_single(state: dict, folder: Path) -> None:
    """``state``: real torch tensors and plain values (``trees.materialise`` of a plain tree)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")  # single process on purpose
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)


def write_sharded(plain_pt: Path, folder: Path, world: int) -> None:
    """``plain_pt``: a torch zip holding only weights_only-loadable values (written by us)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_worker, args=(world, store, str(plain_pt), str(folder)), nprocs=world, join=True)


def consolidate(folder: Path, out: Path) -> None:
    """One torch.save file from a DCP folder, through torch's ``dcp_to_torch_save``.  That function unpickles
    ``.metadata`` and the items with real pickle: callers must have judged the folder safe first
    (``commands/_inputs.open_input`` does)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(out))


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


def _die_with_parent() -> None:
    """A rank of a killed conversion must not run on: ask Linux to SIGKILL it when its parent dies."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def _worker(rank: int, world: int, store: str, src: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    _die_with_parent()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)  # written by us, tensors only
        dcp.save(_shard(state, mesh, world), storage_writer=dcp.FileSystemWriter(out))
    finally:
        dist.destroy_process_group()


def write_converted(tree: Any, request: WriteRequest) -> None:
    """`ckpt convert`'s entry (formats/base.py): one rank through torch's own API, or ``world_size`` gloo ranks
    each writing its shards from a streamed staging .pt; ``check_folder`` runs on the finished folder before it
    takes the output's name."""
    if not isinstance(tree, dict):
        raise UsageError(f"{request.input_name}: DCP needs a dict at the top of the checkpoint")
    refuse_unwritable(tree, request, "a DCP folder", writable)
    request.notes.extend(notes_for(tree))
    # the tree as DCP will give it back (string keys, no empty dicts), so its digest is the one a reader finds
    tree = as_dcp_returns(to_plain_tree(tree, request.notes))
    if refresh_digest(tree, request.source):
        request.notes.append("content digest recomputed for the tree as DCP returns it")
    if request.world_size == 1:
        request.notes.append("DCP: torch's API holds the whole state dict in memory while saving")
        with atomic_folder(request.out, verify=request.check_folder, replace=request.replace) as tmp:
            write_single(materialise(tree), tmp)
        return
    plain = temp_path(request.out, "plain")
    try:
        torchzip.write_file(tree, plain, request.source)  # streamed; each rank maps it and takes its shards
        with atomic_folder(request.out, verify=request.check_folder, replace=request.replace) as tmp:
            write_sharded(plain, tmp, request.world_size)
    finally:
        plain.unlink(missing_ok=True)
    request.notes.append(f"DCP: written by {request.world_size} gloo processes, tensors sharded along dim 0 (DTensor)")
