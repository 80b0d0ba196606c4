"""One streaming pass over a storage: CRC32 of its record, NaN/Inf count, and the bytes for the digest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from ckpttools import torchzip
from ckpttools.unpickle import LazyTensor, StorageRef

# a float is NaN or Inf exactly when all its exponent bits are set
EXPONENT_MASKS = {"float32": (np.uint32, 0x7F800000), "float64": (np.uint64, 0x7FF0000000000000),
                  "float16": (np.uint16, 0x7C00), "bfloat16": (np.uint16, 0x7F80),
                  "complex64": (np.uint32, 0x7F800000), "complex128": (np.uint64, 0x7FF0000000000000)}


FLOAT_VIEWS = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "complex64": np.float32,
               "complex128": np.float64}


def count_nonfinite(chunk: bytes, dtype: str) -> int:
    spec = EXPONENT_MASKS.get(dtype)
    if spec is None:
        return 0
    view = FLOAT_VIEWS.get(dtype)
    if view is not None:  # the common case: a SIMD isfinite pass, counting only when something is off
        n = len(chunk) // np.dtype(view).itemsize
        if n == 0 or np.isfinite(np.frombuffer(chunk, dtype=view, count=n)).all():
            return 0
    elif dtype == "bfloat16":
        a = np.frombuffer(chunk, dtype=np.uint16, count=len(chunk) // 2)
        if a.size == 0 or np.bitwise_and(a, np.uint16(0x7FFF)).max() < 0x7F80:
            return 0
    kind, mask = spec
    n = len(chunk) // np.dtype(kind).itemsize
    if n == 0:
        return 0
    a = np.frombuffer(chunk, dtype=kind, count=n)
    return int(np.count_nonzero(np.bitwise_and(a, kind(mask)) == kind(mask)))


@dataclass
class StorageResult:
    bytes_read: int = 0
    crc: int = 0
    nonfinite: int = 0
    complete: bool = False


class StorageScanner:
    """Reads each storage once; results by storage object (keys repeat across a DCP folder's items)."""

    def __init__(self, ckpt, chunk: int = torchzip.CHUNK, on_bytes=None):
        self.ckpt, self.chunk = ckpt, chunk
        self.results: dict[int, StorageResult] = {}
        self.on_bytes = on_bytes  # progress callback(nbytes)

    def stream(self, ref: StorageRef) -> Iterator[bytes]:
        """Yield the storage's bytes; the first full pass records CRC and NaN/Inf count."""
        if id(ref) in self.results:
            yield from self.ckpt.storage_chunks(ref, self.chunk)
            return
        result = StorageResult()
        for block in self.ckpt.storage_chunks(ref, self.chunk):
            result.crc = torchzip.crc32(block, result.crc)
            result.nonfinite += count_nonfinite(block, ref.dtype)
            result.bytes_read += len(block)
            if self.on_bytes:
                self.on_bytes(len(block))
            yield block
        result.complete = True
        self.results[id(ref)] = result

    def scan(self, ref: StorageRef) -> StorageResult:
        if id(ref) not in self.results:
            for _ in self.stream(ref):
                pass
        return self.results[id(ref)]


def tensor_bytes(t: LazyTensor, blocks: Iterable[bytes]) -> Iterator[bytes]:
    """The tensor's elements in C order, cut from ``blocks`` (its storage's bytes, in order).

    Contiguous views are sliced as they stream; a strided view (rare in checkpoints) is materialised.  A view
    that reaches past its storage (a damaged or hostile shape) raises OSError rather than allocate for it."""
    itemsize = t.storage.dtype.itemsize
    if t.numel == 0:
        return
    if t.extent() > t.storage.numel or any(d < 0 for d in t.shape) or any(st < 0 for st in t.stride):
        raise OSError(f"tensor view {list(t.shape)} / {list(t.stride)} reaches past its storage of {t.storage.numel}")
    if t.is_contiguous_view():
        start, end = t.storage_offset * itemsize, (t.storage_offset + t.numel) * itemsize
        pos = 0
        for block in blocks:
            lo, hi = max(start, pos), min(end, pos + len(block))
            if lo < hi:
                yield block[lo - pos: hi - pos] if (lo - pos, hi - pos) != (0, len(block)) else block
            pos += len(block)
        return
    kind = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64, 16: np.complex128}[itemsize]
    arr = np.frombuffer(b"".join(blocks), dtype=kind)
    view = np.lib.stride_tricks.as_strided(arr[t.storage_offset:], shape=t.shape,
                                           strides=[s * itemsize for s in t.stride])
    yield np.ascontiguousarray(view).tobytes()
