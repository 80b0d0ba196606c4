"""One pass over each storage's bytes: CRC32 of its record, NaN/Inf count, and the xxh3-128 the content digest
(v2) needs, all on the same buffer.

For a torch zip the file is memory-mapped (no copies) and the storages are spread over a small thread pool:
ISA-L's crc32, numpy's isfinite and xxhash release the GIL on large buffers, so two cores do twice the work.
Pages are dropped from the mapping after each block (the page cache keeps them), so resident memory stays at
a few blocks whatever the file size.  Other containers are read block by block through their format."""

from __future__ import annotations

import functools
import math
import mmap
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import xxhash
from threadpoolctl import ThreadpoolController
from xxhash import xxh3_128_digest

from ckpttools.formats import zipformat
from ckpttools.formats.base import CHUNK
from ckpttools.tensors import DTYPES, DType, StorageRef

# complex values are scanned as their real and imaginary parts
FLOAT_VIEWS = {
    d.name: np.dtype(d.numpy).type if not d.name.startswith("complex") else np.dtype(d.numpy).type(0).real.dtype.type
    for d in DTYPES.values()
    if d.floating and d.numpy
}
# 32- and 64-bit floats get a quick test first: the dot product of a block with itself, which is NaN or Inf if
# any value is (NaN propagates, Inf squared is +Inf and nothing negative can cancel it); only when it is not
# finite (a NaN or Inf, or finite values past 1e19 whose squares overflow) are the values counted one by one.
# BLAS's dot streams a block once: the whole pass is 12 % faster than with numpy's isfinite, which writes and
# rereads a mask (fresh processes alternated).  Narrower floats (numpy has no BLAS for them) get the exponent
# test below, which is SIMD for every width (16-19 GB/s a core).
DOT_VIEWS = {name: view for name, view in FLOAT_VIEWS.items() if np.dtype(view).itemsize >= 4}


# numpy's floating-point warnings off: the quick test's NaN and overflow are its answers, and numpy would print
# each as a RuntimeWarning on the user's stderr.  numpy keeps this setting per thread.
QUIET_FLOATS = {"over": "ignore", "invalid": "ignore"}


def _quiet_thread() -> None:
    np.seterr(**QUIET_FLOATS)  # the pool's own threads, which end with the pass


def count_nonfinite(chunk: bytes, dtype: str) -> int:
    """NaN/Inf values in ``chunk``, by the dtype's bits (``DTypeInfo.exponent_mask`` / ``nonfinite_bits``: all
    exponent bits set in IEEE formats, the fp8 formats' own NaN patterns)."""
    with np.errstate(**QUIET_FLOATS):
        return nonfinite_counter(dtype)(chunk)


@functools.cache
def nonfinite_counter(dtype: str) -> Callable[[bytes], int]:
    """``count_nonfinite`` for one dtype, with what it needs looked up once: the pass takes one for each storage
    and calls it for every block (4,000 blocks in 2 GB).  Call it where floating-point warnings are off
    (``QUIET_FLOATS``, as in a pool thread of the pass): entering numpy's errstate for each block cost the 2 GB
    pass 5 %."""
    info = DType(dtype).info
    if info.exponent_mask is None:
        return _no_floats
    # complex values: the mask applies to each real and imaginary part, which have the width of half the item
    part = info.itemsize // 2 if dtype.startswith("complex") else info.itemsize
    kind = np.dtype(f"uint{8 * part}")
    mask = kind.type(info.exponent_mask)
    target = mask if info.nonfinite_bits is None else kind.type(info.nonfinite_bits)
    view = DOT_VIEWS.get(dtype)
    quick = np.dtype(view) if view is not None else None

    def count(chunk: bytes) -> int:
        # a quick test of the whole chunk first (DOT_VIEWS); counted only when it fails
        if quick is not None:
            values = np.frombuffer(chunk, dtype=quick, count=len(chunk) // quick.itemsize)
            if math.isfinite(values.dot(values)):
                return 0
        n = len(chunk) // kind.itemsize
        if n == 0:
            return 0
        exponents = np.bitwise_and(np.frombuffer(chunk, dtype=kind, count=n), mask)
        if quick is None and target == mask and exponents.max() != mask:  # x & mask <= mask: equal only if all set
            return 0
        return int(np.count_nonzero(exponents == target))

    return count


def _no_floats(chunk: bytes) -> int:
    return 0


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()  # finds numpy's BLAS once (it is loaded with this module)


def one_blas_thread():
    """A context in which BLAS runs each call on the calling thread.  The pass already keeps every core busy
    with its own threads; BLAS's pool would wake for each block's dot (it spins, taking a core) and the pass
    ran about a tenth slower with it.  What the caller's BLAS was set to is restored on leaving."""
    return _blas().limit(limits=1, user_api="blas")


@dataclass(slots=True)  # one per storage: 200,000 in an optimizer's checkpoint
class StorageResult:
    bytes_read: int = 0
    crc: int = 0
    nonfinite: int = 0
    complete: bool = False
    xxh3: bytes | None = None  # xxh3-128 of the storage's bytes (the digest leaf of a tensor that covers it)


PAGE = mmap.PAGESIZE
# A mapped record is scanned in blocks that fit a core's L2 cache, so the CRC32, NaN/Inf and xxh3 passes over
# a block read memory once: 9.0 GB/s a core against 5.2 at 8 MiB blocks (measured on the 2-core test machine;
# 128 KiB: 7.2, 1 MiB: 7.8).  Our mapping's pages are dropped every DROP_EVERY bytes.
SCAN_BLOCK = 512 << 10
DROP_EVERY = 8 << 20
WORKERS = max(1, min(4, os.cpu_count() or 1))


BATCH_BYTES, BATCH_ITEMS = 8 << 20, 4096
SMALL_RECORD = 4096  # bytes: records up to this size are scanned in one plain loop (``_scan_small``)


def _batches(order: list) -> Iterator[list]:
    """Records grouped for the pool: a big one alone, small ones together (200,000 tiny storages as one task
    each cost more in the pool's locks than in reading them)."""
    batch, size = [], 0
    for item in order:
        batch.append(item)
        size += item[2]
        if size >= BATCH_BYTES or len(batch) >= BATCH_ITEMS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class StorageScanner:
    """Reads each storage once; results by storage object (keys repeat across a DCP folder's items).

    ``leaves``: also take each storage's xxh3-128, the content digest's leaf.  Only a checkpoint that carries a
    digest needs them; for the rest (every file other tools write) leaving xxh3 out makes the pass a tenth
    faster."""

    def __init__(self, ckpt, chunk: int = CHUNK, on_bytes=None, leaves: bool = True):
        self.ckpt, self.chunk, self.leaves = ckpt, chunk, leaves
        self.results: dict[int, StorageResult] = {}
        self.on_bytes = on_bytes  # progress callback(nbytes)

    def stream(self, ref: StorageRef) -> Iterator[bytes]:
        """Yield the storage's bytes; the first full pass records CRC and NaN/Inf count."""
        if id(ref) in self.results:
            yield from self.ckpt.storage_chunks(ref, self.chunk)
            return
        result = StorageResult()
        for block in self.ckpt.storage_chunks(ref, self.chunk):
            result.crc = zipformat.crc32(block, result.crc)
            result.nonfinite += count_nonfinite(block, ref.dtype)
            result.bytes_read += len(block)
            if self.on_bytes:
                self.on_bytes(len(block))
            yield block
        result.complete = True
        self.results[id(ref)] = result

    def scan(self, ref: StorageRef) -> StorageResult:
        if id(ref) not in self.results:
            h = xxhash.xxh3_128() if self.leaves else None
            for block in self.stream(ref):
                if h is not None:
                    h.update(block)
            self.results[id(ref)].xxh3 = h.digest() if h is not None else None
        return self.results[id(ref)]

    def scan_all(self, refs: Iterable[StorageRef]) -> None:
        """Scan every storage once: a torch zip's records memory-mapped and spread over threads; the rest in
        turn.  Unreadable storages are left out of ``results`` (their checks report them)."""
        refs = [r for r in refs if id(r) not in self.results]
        mappable = self.ckpt.format == "torch-zip" and self.ckpt.record_of is not None and self.ckpt.path.is_file()
        mapped = [span for span in map(self._plain_span, refs) if span is not None] if mappable else []
        if mapped:
            with (
                one_blas_thread(),
                open(self.ckpt.path, "rb") as f,
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
            ):
                order = sorted(mapped, key=lambda span: -span[2])  # big ones first: the pool stays balanced
                small = [span for span in order if span[2] <= SMALL_RECORD]
                large = order[: len(order) - len(small)]
                with ThreadPoolExecutor(WORKERS, initializer=_quiet_thread) as pool:
                    for batch in pool.map(
                        lambda items: [self._scan_mapped(mm, *item) for item in items], _batches(large)
                    ):
                        for ref, result in batch:
                            self.results[id(ref)] = result
                for ref, result in self._scan_small(mm, small):
                    self.results[id(ref)] = result
        for ref in refs:
            if id(ref) not in self.results:
                try:
                    self.scan(ref)
                except OSError:
                    continue

    def _scan_small(self, mm: mmap.mmap, items: list) -> list[tuple[StorageRef, StorageResult]]:
        """Small records in one loop, without the per-block machinery: one CRC32 and one xxh3 call each, and
        the NaN/Inf test once over all floats of a dtype together (counted record by record only if it fails).
        200,000 tiny storages (an optimizer's state) cost a second less this way."""
        out, floats = [], defaultdict(list)
        total, reads = 0, zipformat.MappedReads(mm)  # records far apart each map a folio: RSS kept flat
        for ref, start, size in items:
            block = reads.read(start, min(start + size, len(mm)))
            leaf = xxh3_128_digest(block) if self.leaves else None
            result = StorageResult(len(block), zipformat.crc32(block), 0, True, leaf)
            out.append((ref, result))
            total += len(block)
            info = DType(ref.dtype).info
            if info.exponent_mask is None:
                continue
            if len(block) % info.itemsize:  # a damaged odd size: counted alone (joined, it would shift the rest)
                result.nonfinite = count_nonfinite(block, ref.dtype)
            else:
                floats[ref.dtype].append((result, block))
        for dtype, found in floats.items():
            if count_nonfinite(b"".join(block for _, block in found), dtype):
                for result, block in found:
                    result.nonfinite = count_nonfinite(block, dtype)
        if self.on_bytes and total:
            self.on_bytes(total)
        return out

    def _plain_span(self, ref: StorageRef) -> tuple[StorageRef, int, int] | None:
        """(ref, where its bytes start, how many) where ``ref``'s record in a torch zip file is stored
        (uncompressed) and whole, else None.  Three values, not the Record: 200,000 are held during the pass."""
        record = self.ckpt.record_of(ref)
        if record is None or record.truncated or record.method != 0 or record.data_offset < 0:
            return None
        return ref, record.data_offset, record.size

    def _scan_mapped(self, mm: mmap.mmap, ref: StorageRef, start: int, size: int) -> tuple[StorageRef, StorageResult]:
        result, h = StorageResult(), xxhash.xxh3_128() if self.leaves else None
        nonfinite = nonfinite_counter(ref.dtype)
        pos, end = start, min(start + size, len(mm))
        step = min(self.chunk, SCAN_BLOCK)
        mapped_from = pos - pos % PAGE  # our mapping's pages from here to ``pos`` are still resident
        view = memoryview(mm)
        try:
            while pos < end:
                n = min(step, end - pos)
                block = view[pos : pos + n]
                result.crc = zipformat.crc32(block, result.crc)
                result.nonfinite += nonfinite(block)
                if h is not None:
                    h.update(block)
                block.release()
                result.bytes_read += n
                if self.on_bytes:
                    self.on_bytes(n)
                pos += n
                if pos - mapped_from >= DROP_EVERY:  # drop what we mapped (the page cache keeps it): flat RSS
                    top = pos - pos % PAGE
                    mm.madvise(mmap.MADV_DONTNEED, mapped_from, top - mapped_from)
                    mapped_from = top
        finally:
            view.release()
        if end > mapped_from:  # and the record's tail: thousands of records would otherwise each leave theirs
            mm.madvise(mmap.MADV_DONTNEED, mapped_from, end - mapped_from)
        result.complete, result.xxh3 = True, h.digest() if h is not None else None
        return ref, result
