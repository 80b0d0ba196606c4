"""Plain pickles, and legacy (pre-1.6) ``torch.save`` files, which are a row of pickles and raw storages.

A legacy file holds five pickles (magic number, protocol version, sys info, the object, the list of storage
keys) followed by each storage as an 8-byte element count and its bytes.  ``torch.load`` unpickles all five,
so all five are scanned and judged.  Text-protocol pickles (protocol 0/1, starting with ``c``, ``(`` ...) are
recognised as pickles, not as text.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

from ckpttools.formats.base import Checkpoint, storage_from_pid
from ckpttools.pickle.scan import looks_like_pickle, scan_pickle
from ckpttools.pickle.unpickler import RestrictedUnpickler
from ckpttools.report import ERROR, Finding
from ckpttools.tensors import StorageRef

PICKLE, LEGACY = "pickle", "torch-legacy"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PARTS = ("magic number", "protocol version", "sys info", "object", "storage keys")


def detect(path: Path, head: bytes) -> bool:
    if head[:1] == b"\x80":
        return True
    with path.open("rb") as f:
        start = f.read(1 << 20)
    return looks_like_pickle(start)


def read(path: Path) -> Checkpoint:
    data = path.read_bytes()
    first = scan_pickle(data)
    if first.error is None and _is_legacy_magic(data[: first.end]):
        return _read_legacy(path, data)
    ckpt = Checkpoint(path, PICKLE)
    ckpt.tree = ckpt.read_pickle(data, "pickle")
    return ckpt


def _is_legacy_magic(pickle_bytes: bytes) -> bool:
    try:
        value = RestrictedUnpickler(io.BytesIO(pickle_bytes)).load()
    except Exception:  # noqa: BLE001 - not the magic number, whatever it is
        return False
    return value == LEGACY_MAGIC


def _read_legacy(path: Path, data: bytes) -> Checkpoint:
    ckpt = Checkpoint(path, LEGACY)
    offsets: dict[str, tuple[int, int]] = {}
    # scan every pickle torch.load would unpickle, before reading any of them
    pos, spans = 0, []
    for part in LEGACY_PARTS:
        scan = scan_pickle(data, pos)
        ckpt.scans.append((f"{part} pickle", scan))
        if scan.error:
            ckpt.findings.append(
                Finding(
                    ERROR,
                    "pickle.unreadable",
                    f"legacy torch file: the {part} pickle cannot be read ({scan.error})",
                    f"{part} pickle",
                )
            )
            return ckpt
        spans.append((pos, scan.end))
        pos = scan.end
    stream = io.BytesIO(data)

    def reader(ref: StorageRef) -> bytes:
        start, size = offsets[ref.key]
        return data[start : start + size]

    try:
        for _ in range(3):  # magic, protocol version, sys info: plain values
            RestrictedUnpickler(stream).load()
        ckpt.tree = RestrictedUnpickler(stream, lambda pid: storage_from_pid(ckpt, pid, reader)).load()
        keys = RestrictedUnpickler(stream).load()
        pos = stream.tell()
        for key in keys:
            ref = ckpt.storages.get(str(key))
            (n,) = struct.unpack("<q", data[pos : pos + 8])
            size = n * (ref.dtype.itemsize if ref else 1)
            offsets[str(key)] = (pos + 8, size)
            pos += 8 + size
        if pos > len(data):
            ckpt.findings.append(
                Finding(
                    ERROR,
                    "legacy.truncated",
                    f"storage data runs past the end of the file ({pos} > {len(data)} bytes)",
                    "storages",
                )
            )
    except Exception as exc:  # noqa: BLE001
        ckpt.findings.append(
            Finding(
                ERROR,
                "pickle.unreadable",
                f"legacy torch file cannot be read: {exc.__class__.__name__}: {exc}",
                "pickle",
            )
        )
        return ckpt

    def iter_storage(ref: StorageRef, chunk: int):
        start, size = offsets.get(ref.key, (0, 0))
        for i in range(start, start + size, chunk):
            yield data[i : min(start + size, i + chunk)]

    ckpt.iter_storage = iter_storage
    return ckpt
