"""One tensor pair compared the way ``ckpt diff`` reports it: equal by CRC32 when both zip records say so, else
streamed chunk by chunk in float64 (max / mean absolute difference, relative L2, values outside the tolerance,
NaN/Inf on each side), memory independent of the tensor's size."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ckpttools.formats.registry import Checkpoint
from ckpttools.tensors import DTYPES, LazyTensor, tensor_bytes

NUMPY = {d.name: np.dtype(d.numpy).type for d in DTYPES.values() if d.numpy and not d.name.startswith("complex")}
CHUNK_ELEMENTS = 1 << 21


@dataclass
class TensorDiff:
    name: str
    section: str
    shape_a: tuple | None = None
    shape_b: tuple | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    identical: bool = False
    max_abs: float = 0.0
    mean_abs: float = 0.0
    rel_l2: float = 0.0
    outside: int = 0
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _as_float(chunk: bytes, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.frombuffer(chunk, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.frombuffer(chunk, NUMPY[dtype]).astype(np.float64)


def _rechunk(pieces: Iterator[bytes], size: int) -> Iterator[bytes]:
    """The same bytes in pieces of exactly ``size`` (the last may be shorter), so two tensors align."""
    pending = b""
    for piece in pieces:
        pending += piece
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


def _tensor_chunks(ckpt: Checkpoint, t: LazyTensor, chunk_bytes: int) -> Iterator[bytes]:
    return _rechunk(tensor_bytes(t, ckpt.storage_chunks(t.storage)), chunk_bytes)


def _record_fingerprint(ckpt: Checkpoint, t: LazyTensor):
    rec = ckpt.record_of(t.storage) if ckpt.record_of else None
    if rec is None or not t.is_contiguous_view() or t.storage_offset or t.numel != t.storage.numel:
        return None
    return (rec.crc, rec.size)


def equal_by_crc(a_ck: Checkpoint, a: LazyTensor, b_ck: Checkpoint, b: LazyTensor) -> bool:
    """What ``compare_tensor`` calls "equal by CRC32" (same shape and dtype, whole-storage tensors whose zip
    records have the same CRC32 and size), decided without building its report."""
    if tuple(a.shape) != tuple(b.shape) or a.storage.dtype != b.storage.dtype:
        return False
    fp = _record_fingerprint(a_ck, a)
    return fp is not None and fp[0] is not None and fp == _record_fingerprint(b_ck, b)


def _sum_sq(chunk: bytes, dtype: str) -> float:
    if dtype in ("float32", "float64"):
        x = np.frombuffer(chunk, NUMPY[dtype])
        return float(np.dot(x, x))
    x = _as_float(chunk, dtype)
    return float(np.dot(x, x))


@dataclass
class _Acc:
    sum_abs: float = 0.0
    sum_sq_diff: float = 0.0
    sum_sq_a: float = 0.0


def _accumulate(d: TensorDiff, acc: _Acc, ca: bytes, cb: bytes, da: str, db: str, atol: float, rtol: float) -> None:
    xa, xb = _as_float(ca, da), _as_float(cb, db)
    fa, fb = np.isfinite(xa), np.isfinite(xb)
    d.nonfinite_a += int(xa.size - fa.sum())
    d.nonfinite_b += int(xb.size - fb.sum())
    both = fa & fb
    diff = np.abs(xa[both] - xb[both])
    if diff.size:
        d.max_abs = max(d.max_abs, float(diff.max()))
        d.outside += int((diff > atol + rtol * np.abs(xb[both])).sum())
    d.outside += int((fa != fb).sum())  # NaN / Inf on one side only
    acc.sum_abs += float(diff.sum())
    acc.sum_sq_diff += float(np.dot(diff, diff))
    acc.sum_sq_a += float(np.dot(xa[both], xa[both]))


def compare_tensor(
    name: str,
    section: str,
    a_ck: Checkpoint,
    a: LazyTensor,
    b_ck: Checkpoint,
    b: LazyTensor,
    atol: float,
    rtol: float,
    _trust_crc: bool = True,
    exact: bool = False,
) -> TensorDiff:
    """Compare two tensors chunk by chunk: bitwise identity, then value statistics for what differs.  Two
    whole-storage tensors whose zip records have the same size and CRC32 are equal by CRC without reading
    them, unless ``exact``."""
    d = TensorDiff(name, section, tuple(a.shape), tuple(b.shape), str(a.dtype), str(b.dtype))
    if tuple(a.shape) != tuple(b.shape):
        d.note = "shape changed"
        return d
    numeric = all(t.dtype in NUMPY or t.dtype == "bfloat16" for t in (a, b))
    same_dtype = a.dtype == b.dtype
    likely_same = _trust_crc and equal_by_crc(a_ck, a, b_ck, b)
    if likely_same and not exact:
        d.identical, d.note = True, "equal by CRC32"
        return d
    acc, bitwise = _Acc(), same_dtype
    chunks_a = _tensor_chunks(a_ck, a, CHUNK_ELEMENTS * a.dtype.itemsize)
    chunks_b = _tensor_chunks(b_ck, b, CHUNK_ELEMENTS * b.dtype.itemsize)
    for ca, cb in zip(chunks_a, chunks_b):
        if same_dtype and ca == cb:  # confirmed by content
            if numeric and not likely_same:
                acc.sum_sq_a += _sum_sq(ca, a.dtype)
            continue
        bitwise = False
        if likely_same:  # a CRC32 collision: start again with full statistics (practically never)
            return compare_tensor(name, section, a_ck, a, b_ck, b, atol, rtol, _trust_crc=False, exact=exact)
        if numeric:
            _accumulate(d, acc, ca, cb, a.dtype, b.dtype, atol, rtol)
        elif not same_dtype:
            d.outside = a.numel
    d.identical = bitwise
    if not bitwise and numeric:
        d.mean_abs = acc.sum_abs / max(1, a.numel)
        d.rel_l2 = (
            math.sqrt(acc.sum_sq_diff) / math.sqrt(acc.sum_sq_a)
            if acc.sum_sq_a
            else (0.0 if acc.sum_sq_diff == 0 else math.inf)
        )
    if not same_dtype:
        d.note = "dtype changed"
    elif not bitwise and not numeric:
        d.note = "bytes differ"
    return d
