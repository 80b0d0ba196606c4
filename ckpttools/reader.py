"""Open any supported checkpoint safely: detect the container, unpickle with the restricted unpickler, and
give back a tree whose tensors are ``LazyTensor`` descriptions read one storage at a time.

Containers: ``torch.save`` zip, legacy (pre-1.6) torch files, plain pickles, safetensors, HDF5, and
``torch.distributed.checkpoint`` folders.  Nothing here imports torch or runs code from the file.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ckpttools import torchzip
from ckpttools.report import ERROR, WARNING, Finding
from ckpttools.unpickle import (DType, LazyTensor, Reference, StorageRef, contiguous_strides, restricted_load,
                                scan_globals)

ZIP, LEGACY, PICKLE, SAFETENSORS, HDF5, DCP, UNKNOWN = ("torch-zip", "torch-legacy", "pickle", "safetensors", "hdf5",
                                                         "dcp", "unknown")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class NotACheckpoint(Exception):
    """The path is not a checkpoint this tool can read; the message says what it is instead."""


@dataclass
class Checkpoint:
    """A checkpoint opened for inspection.  ``tree`` holds plain values and LazyTensors."""

    path: Path
    format: str
    tree: Any = None
    references: list[Reference] = field(default_factory=list)  # every global the pickle names
    findings: list[Finding] = field(default_factory=list)  # container problems seen while opening
    records: dict[str, torchzip.Record] = field(default_factory=dict)  # zip records by name
    storages: dict[str, StorageRef] = field(default_factory=dict)
    storage_records: dict[str, str] = field(default_factory=dict)  # storage key -> record name
    pickle_bytes: bytes | None = None
    iter_storage: Callable[[StorageRef, int], Iterator[bytes]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    record_of: Callable[[StorageRef], "torchzip.Record | None"] | None = None  # the zip record behind a storage

    def storage_chunks(self, ref: StorageRef, chunk: int = torchzip.CHUNK) -> Iterator[bytes]:
        if self.iter_storage is None:
            return iter(())
        return self.iter_storage(ref, chunk)


def detect_format(path: Path) -> str:
    if path.is_dir():
        return DCP if (path / ".metadata").is_file() else UNKNOWN
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == torchzip.LOCAL_MAGIC or head[:4] == b"PK\x05\x06":
        return ZIP
    if head[:8] == HDF5_MAGIC:
        return HDF5
    if len(head) >= 9:
        n = struct.unpack("<Q", head[:8])[0]
        if 2 <= n < 100_000_000 and head[8:9] == b"{" and n + 8 <= path.stat().st_size:
            return SAFETENSORS
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]"):
        return PICKLE  # LEGACY is told apart after reading the first pickle (the magic number)
    return UNKNOWN


def describe_non_checkpoint(path: Path) -> str:
    if path.is_dir():
        return "a folder without .metadata (not a torch.distributed.checkpoint folder)"
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(16)
    kinds = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"%PDF": "a PDF",
             b"\x1f\x8b": "a gzip file", b"BM": "a BMP image"}
    for magic, what in kinds.items():
        if head.startswith(magic):
            return what
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return f"not a known checkpoint container ({size} bytes, starts with {head[:8].hex()})"


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open ``path``.  Raises FileNotFoundError, or NotACheckpoint for anything unreadable as a checkpoint;
    container damage that still leaves something to describe is returned as findings."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(str(path))
    fmt = detect_format(path)
    if fmt == UNKNOWN:
        raise NotACheckpoint(describe_non_checkpoint(path))
    opener = {ZIP: _open_zip, PICKLE: _open_pickle, SAFETENSORS: _open_safetensors, HDF5: _open_hdf5,
              DCP: _open_dcp}[fmt]
    return opener(path)


# ---- torch zip ------------------------------------------------------------------------------------------------

def open_embedded_zip(path: Path, base: int, length: int) -> Checkpoint:
    """A torch.save zip stored inside another file at ``base`` (how DCP stores each item)."""
    return _open_zip(path, base, length)


def _open_zip(path: Path, base: int = 0, length: int | None = None) -> Checkpoint:
    ckpt = Checkpoint(path, ZIP)
    try:
        records, problems = torchzip.read_records(path, base, length)
        ckpt.findings.extend(Finding(ERROR, p.code, p.message, p.where) for p in problems)
    except torchzip.ZipStructureError as exc:
        records = exc.records
        complete = [r for r in records if not r.truncated]  # (offsets already absolute)
        ckpt.findings.append(Finding(ERROR, "zip.no-central-directory",
                                     f"zip end records missing or damaged ({exc}): the file is truncated or its end "
                                     f"is corrupt; {len(complete)} complete record(s) found by scanning "
                                     f"(`ckpt repair` can salvage them)", "central directory"))
        for r in records:
            if r.truncated:
                ckpt.findings.append(Finding(ERROR, "zip.record-truncated", f"record {r.name} is cut off", r.name))
    ckpt.records = {r.name: r for r in records}
    pkl_name = torchzip.pickle_record_name(list(ckpt.records))
    if pkl_name is None:
        ckpt.findings.append(Finding(ERROR, "zip.no-pickle", "no data.pkl record: not a torch.save checkpoint "
                                     "or the record is lost", "data.pkl"))
        return ckpt
    top = pkl_name[: -len("data.pkl")]
    pkl = ckpt.records[pkl_name]
    if pkl.truncated:
        return ckpt
    data = torchzip.read_record(path, pkl)
    ckpt.pickle_bytes = data
    if pkl.crc is not None and torchzip.crc32(data) != pkl.crc:
        # a damaged pickle describes nothing reliable, and unpickling garbage can cost minutes: name what it
        # references (static scan) and stop there
        ckpt.references = list(dict.fromkeys(scan_globals(data)[0]))
        ckpt.findings.append(Finding(ERROR, "pickle.damaged", f"{pkl_name} fails its CRC32 check; it was not "
                                     "unpickled (its references are still listed)", pkl_name))
        return ckpt
    byteorder = ckpt.records.get(top + "byteorder")
    if byteorder is not None and not byteorder.truncated and torchzip.read_record(path, byteorder).strip() == b"big":
        ckpt.findings.append(Finding(WARNING, "zip.big-endian", "tensors were saved big-endian; values are read as "
                                     "little-endian here", top + "byteorder"))

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, storage_type, key, location, numel = pid[:5]
        key = str(key)
        if key not in ckpt.storages:
            dtype = storage_type if isinstance(storage_type, DType) else DType("uint8")
            ckpt.storages[key] = StorageRef(key, dtype, int(numel), str(location), _zip_reader(path, ckpt))
            ckpt.storage_records[key] = top + "data/" + key
        return ckpt.storages[key]

    _unpickle_into(ckpt, data, persistent_load)

    def iter_storage(ref: StorageRef, chunk: int):
        record = ckpt.record_of(ref)
        return torchzip.iter_record_bytes(path, record, chunk) if record and not record.truncated else iter(())

    ckpt.iter_storage = iter_storage
    ckpt.record_of = lambda ref: ckpt.records.get(ckpt.storage_records.get(ref.key, ""))
    return ckpt


def _zip_reader(path: Path, ckpt: Checkpoint):
    def read(ref: StorageRef) -> bytes:
        record = ckpt.record_of(ref)
        if record is None or record.truncated:
            raise OSError(f"storage record for {ref.key} is missing or truncated")
        return torchzip.read_record(path, record)
    return read


def _unpickle_into(ckpt: Checkpoint, data: bytes, persistent_load) -> None:
    static_refs, scan_error = scan_globals(data)
    try:
        ckpt.tree, runtime_refs = restricted_load(data, persistent_load)
    except Exception as exc:  # noqa: BLE001 - any failure of a damaged or hostile pickle is a finding
        runtime_refs = []
        ckpt.findings.append(Finding(ERROR, "pickle.unreadable", f"the pickle cannot be read: "
                                     f"{exc.__class__.__name__}: {exc}", "data.pkl" if ckpt.format == ZIP else "pickle"))
    ckpt.references = list(dict.fromkeys(static_refs + runtime_refs))
    if scan_error and ckpt.tree is not None:
        ckpt.findings.append(Finding(WARNING, "pickle.scan-incomplete", f"static scan stopped early: {scan_error}",
                                     "pickle"))


# ---- plain pickles and legacy torch files -------------------------------------------------------------------------

def _open_pickle(path: Path) -> Checkpoint:
    data = path.read_bytes()
    # legacy torch: magic number, protocol, sys_info, then the object, then storage keys, then raw storages
    try:
        first, _ = restricted_load(data[: 64])
    except Exception:  # noqa: BLE001
        first = None
    if first == LEGACY_MAGIC:
        return _open_legacy(path, data)
    ckpt = Checkpoint(path, PICKLE, pickle_bytes=data)
    _unpickle_into(ckpt, data, None)
    return ckpt


def _open_legacy(path: Path, data: bytes) -> Checkpoint:
    import io

    ckpt = Checkpoint(path, LEGACY)
    stream = io.BytesIO(data)

    def persistent_load(pid):
        typename = pid[0]
        if typename != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage_type, root_key, location, numel = pid[1:5]
        key = str(root_key)
        if key not in ckpt.storages:
            dtype = storage_type if isinstance(storage_type, DType) else DType("uint8")
            ckpt.storages[key] = StorageRef(key, dtype, int(numel), str(location), None)
        return ckpt.storages[key]

    try:
        for _ in range(3):  # magic, protocol version, sys info
            restricted_load(stream)
        start = stream.tell()
        ckpt.pickle_bytes = data[start:]
        static_refs, _ = scan_globals(data[start:])
        from ckpttools.unpickle import RestrictedUnpickler
        unpickler = RestrictedUnpickler(stream, persistent_load)
        ckpt.tree = unpickler.load()
        keys, _ = restricted_load(stream)
        ckpt.references = list(dict.fromkeys(static_refs + unpickler.references))
        offsets = {}
        pos = stream.tell()
        for key in keys:
            ref = ckpt.storages.get(str(key))
            (n,) = struct.unpack("<q", data[pos: pos + 8])
            itemsize = ref.dtype.itemsize if ref else 1
            offsets[str(key)] = (pos + 8, n * itemsize)
            pos += 8 + n * itemsize
        if pos > len(data):
            ckpt.findings.append(Finding(ERROR, "legacy.truncated", f"storage data runs past the end of the file "
                                         f"({pos} > {len(data)} bytes)", "storages"))
    except Exception as exc:  # noqa: BLE001
        ckpt.findings.append(Finding(ERROR, "pickle.unreadable", f"legacy torch file cannot be read: "
                                     f"{exc.__class__.__name__}: {exc}", "pickle"))
        if not ckpt.references and ckpt.pickle_bytes:
            ckpt.references = scan_globals(ckpt.pickle_bytes)[0]
        return ckpt

    def reader(ref: StorageRef) -> bytes:
        start, size = offsets[ref.key]
        return data[start: start + size]

    for ref in ckpt.storages.values():
        ref.reader = reader

    def iter_storage(ref: StorageRef, chunk: int):
        start, size = offsets.get(ref.key, (0, 0))
        for i in range(start, start + size, chunk):
            yield data[i: min(start + size, i + chunk)]

    ckpt.iter_storage = iter_storage
    return ckpt


# ---- safetensors ----------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
                      "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _open_safetensors(path: Path) -> Checkpoint:
    ckpt = Checkpoint(path, SAFETENSORS)
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise NotACheckpoint(f"safetensors header is not valid JSON ({exc})") from None
    base = 8 + n
    ckpt.metadata = dict(header.pop("__metadata__", None) or {})
    tree = {}
    spans = []
    for name, info in header.items():
        dtype = DType(SAFETENSORS_DTYPES.get(info.get("dtype"), "uint8"))
        shape = tuple(info.get("shape", ()))
        start, end = info.get("data_offsets", (0, 0))
        numel = 1
        for s in shape:
            numel *= s
        if (end - start) != numel * dtype.itemsize:
            ckpt.findings.append(Finding(ERROR, "safetensors.size-mismatch", f"{name}: {end - start} bytes for "
                                         f"{dtype} {list(shape)} (needs {numel * dtype.itemsize})", name))
        if base + end > size:
            ckpt.findings.append(Finding(ERROR, "safetensors.truncated", f"{name}: data ends at {base + end}, file "
                                         f"has {size} bytes", name))
        spans.append((start, end, name))
        ref = StorageRef(name, dtype, numel, "cpu", None)
        ref.reader = lambda r, s=start, e=end: _pread(path, base + s, e - s)
        ckpt.storages[name] = ref
        tree[name] = LazyTensor(ref, 0, shape, contiguous_strides(shape))
    spans.sort()
    for (s1, e1, n1), (s2, e2, n2) in zip(spans, spans[1:]):
        if s2 < e1:
            ckpt.findings.append(Finding(ERROR, "safetensors.overlap", f"{n1} and {n2} overlap in the data area", n2))
    ckpt.tree = tree

    def iter_storage(ref: StorageRef, chunk: int):
        start, end = header[ref.key]["data_offsets"]
        yield from _iter_file_range(path, base + start, end - start, chunk)

    ckpt.iter_storage = iter_storage
    return ckpt


def _pread(path: Path, offset: int, size: int) -> bytes:
    return b"".join(_iter_file_range(path, offset, size, torchzip.CHUNK))


def _iter_file_range(path: Path, offset: int, size: int, chunk: int) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        pos, end = offset, offset + size
        while pos < end:
            block = os.pread(fd, min(chunk, end - pos), pos)
            if not block:
                return
            pos += len(block)
            yield block
    finally:
        os.close(fd)


# ---- HDF5 ------------------------------------------------------------------------------------------------------------

def _open_hdf5(path: Path) -> Checkpoint:
    from ckpttools import hdf5_format

    return hdf5_format.open_hdf5(path)


# ---- torch.distributed.checkpoint folders ------------------------------------------------------------------------

def _open_dcp(path: Path) -> Checkpoint:
    from ckpttools import dcp_format

    return dcp_format.open_dcp(path)


# ---- walking trees ---------------------------------------------------------------------------------------------------

def iter_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, LazyTensor]]:
    """(path, tensor) for every LazyTensor in the tree, paths like ``model/backbone.stem.0.weight``;
    placeholder objects are walked through their recorded state."""
    from ckpttools.unpickle import Placeholder

    if isinstance(tree, LazyTensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from iter_tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from iter_tensors(v, f"{prefix}[{i}]")
    elif isinstance(tree, Placeholder):
        for part in (tree._state, tree._args, tree._items, tree._dict_items):
            if part:
                yield from iter_tensors(part, prefix)
