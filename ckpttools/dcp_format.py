"""``torch.distributed.checkpoint`` folders, read without torch.distributed and without running pickles.

A DCP folder holds ``.metadata`` (a pickle of DCP's dataclasses: which fully-qualified names exist, their
dtype, size and chunks, and where each item's bytes are) and ``*.distcp`` files.  Each item is a small
``torch.save`` zip embedded at an offset in a ``.distcp`` file; each is read and checked like any other
torch zip.  Tensors saved as one chunk become one tensor; sharded tensors list their chunks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpttools.report import ERROR, WARNING, Finding
from ckpttools.unpickle import LazyTensor, Placeholder, restricted_load, scan_globals


def _state(obj: Any) -> dict:
    return obj.state if isinstance(obj, Placeholder) and isinstance(obj.state, dict) else {}


def _kind(obj: Any) -> str:
    return obj._reference.name if isinstance(obj, Placeholder) else type(obj).__name__


def open_dcp(path: Path):
    from ckpttools.reader import DCP, Checkpoint, open_embedded_zip

    ckpt = Checkpoint(path, DCP)
    meta_bytes = (path / ".metadata").read_bytes()
    ckpt.pickle_bytes = meta_bytes
    static, _ = scan_globals(meta_bytes)
    try:
        metadata, runtime = restricted_load(meta_bytes)
    except Exception as exc:  # noqa: BLE001 - a damaged .metadata is a finding
        ckpt.references = list(dict.fromkeys(static))
        ckpt.findings.append(Finding(ERROR, "dcp.metadata-unreadable", f".metadata cannot be read: {exc}", ".metadata"))
        return ckpt
    ckpt.references = list(dict.fromkeys(static + runtime))
    meta = _state(metadata)
    fqns = meta.get("state_dict_metadata") or {}
    storage = meta.get("storage_data") or {}
    planner = meta.get("planner_data") or {}
    items: dict[str, list[tuple[tuple, Any]]] = {}
    owners: dict[int, Any] = {}  # storage -> the embedded zip it lives in
    for index, info in storage.items():
        idx, where = _state(index), _state(info)
        fqn = idx.get("fqn")
        file = path / str(where.get("relative_path", ""))
        if not file.is_file():
            ckpt.findings.append(Finding(ERROR, "dcp.file-missing", f"{fqn}: data file {file.name} is missing", str(fqn)))
            continue
        offset, length = int(where.get("offset", 0)), int(where.get("length", 0))
        if offset + length > file.stat().st_size:
            ckpt.findings.append(Finding(ERROR, "dcp.truncated", f"{fqn}: bytes {offset}..{offset + length} run past the "
                                         f"end of {file.name}", str(fqn)))
            continue
        sub = open_embedded_zip(file, offset, length)
        for f in sub.findings:
            ckpt.findings.append(Finding(f.severity, f.code, f.message, f"{fqn} ({file.name}@{offset})"))
        ckpt.references = list(dict.fromkeys(ckpt.references + sub.references))
        for key, ref in sub.storages.items():
            ckpt.storages[f"{file.name}@{offset}:{key}"] = ref
            owners[id(ref)] = sub
        items.setdefault(fqn, []).append((tuple(idx.get("offset") or ()), sub.tree))
        ckpt.records.update({f"{file.name}@{offset}/{n}": r for n, r in sub.records.items()})
    tree: dict[str, Any] = {}
    for fqn, md in fqns.items():
        value = _assemble(fqn, md, items.get(fqn, []), ckpt)
        keys = planner.get(fqn) if isinstance(planner.get(fqn), (list, tuple)) else [fqn]
        node = tree
        for k in list(keys)[:-1]:
            node = node.setdefault(str(k), {})
        node[str(list(keys)[-1])] = value
    ckpt.tree = tree
    ckpt.iter_storage = lambda ref, chunk: owners[id(ref)].storage_chunks(ref, chunk) if id(ref) in owners else iter(())
    ckpt.record_of = lambda ref: owners[id(ref)].record_of(ref) if id(ref) in owners else None
    if not ckpt.storages:
        ckpt.findings.append(Finding(WARNING, "dcp.empty", "the folder holds no tensors", str(ckpt.path)))
    return ckpt


def _assemble(fqn: str, md: Any, chunks: list[tuple[tuple, Any]], ckpt) -> Any:
    if not chunks:
        ckpt.findings.append(Finding(ERROR, "dcp.item-missing", f"{fqn} is in .metadata but none of its data was found",
                                     fqn))
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
        ckpt.findings.append(Finding(ERROR, "dcp.chunks-incomplete", f"{fqn}: chunks hold {covered} of {numel} elements",
                                     fqn))
    if len(tensors) == 1 and tuple(tensors[0][1].shape) == size:
        return tensors[0][1]
    return {f"chunk@{list(off)}": t for off, t in sorted(tensors)}
