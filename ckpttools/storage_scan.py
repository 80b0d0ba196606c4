"""One streaming pass over a storage: CRC32 of its record, NaN/Inf count, and the bytes for the digest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ckpttools.formats import ziprecords
from ckpttools.formats.base import CHUNK
from ckpttools.tensors import DTYPES, DType, StorageRef

# floats numpy holds natively get a SIMD isfinite pass first (counting only when something is off); complex
# values are scanned as their real and imaginary parts
FLOAT_VIEWS = {d.name: np.dtype(d.numpy).type if not d.name.startswith("complex") else
               np.dtype(d.numpy).type(0).real.dtype.type for d in DTYPES.values() if d.floating and d.numpy}


def count_nonfinite(chunk: bytes, dtype: str) -> int:
    """NaN/Inf values in ``chunk``: a float is NaN or Inf exactly when all its exponent bits are set."""
    info = DType(dtype).info
    if info.exponent_mask is None:
        return 0
    view = FLOAT_VIEWS.get(dtype)
    if view is not None:
        n = len(chunk) // np.dtype(view).itemsize
        if n == 0 or np.isfinite(np.frombuffer(chunk, dtype=view, count=n)).all():
            return 0
    # complex values: the mask applies to each real and imaginary part, which have the width of half the item
    part = np.dtype(FLOAT_VIEWS[dtype]).itemsize if dtype in FLOAT_VIEWS else info.itemsize
    kind = np.dtype(f"uint{8 * part}").type  # the exponent mask applies to each float (each part of a complex)
    n = len(chunk) // np.dtype(kind).itemsize
    if n == 0:
        return 0
    a = np.frombuffer(chunk, dtype=kind, count=n)
    mask = kind(info.exponent_mask)
    return int(np.count_nonzero(np.bitwise_and(a, mask) == mask))


@dataclass
class StorageResult:
    bytes_read: int = 0
    crc: int = 0
    nonfinite: int = 0
    complete: bool = False


class StorageScanner:
    """Reads each storage once; results by storage object (keys repeat across a DCP folder's items)."""

    def __init__(self, ckpt, chunk: int = CHUNK, on_bytes=None):
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
            result.crc = ziprecords.crc32(block, result.crc)
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
