"""safetensors files: read (header, byte ranges, overlap and size checks) and written one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; the format itself is simple (an 8-byte
header length, a JSON header of name -> dtype / shape / byte range, then the bytes), so this writes it
streaming, and the result is read by ``safetensors.torch.load_file`` like any other (a test checks that).
No pickle is involved, so nothing here can run code.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from ckpttools.atomic import atomic_write
from ckpttools.errors import FormatLimit, NotACheckpoint
from ckpttools.formats.base import CHUNK, Checkpoint, WriteRequest, refuse_unwritable
from ckpttools.report import ERROR, Finding
from ckpttools.tensors import FROM_SAFETENSORS, DType, LazyTensor, StorageRef, contiguous_strides

NAME = "safetensors"


def detect(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return 2 <= n < 100_000_000 and head[8:9] == b"{" and n + 8 <= path.stat().st_size


# codes whose elements are smaller than torch's item: safetensors' shape counts them, torch's counts bytes
# (``float4_e2m1fn_x2`` holds two 4-bit values; safetensors.torch writes shape [..., 2n] for torch's [..., n])
PER_ITEM = {"F4": 2}


def writable(t: LazyTensor) -> bool:
    code = DType(t.dtype).info.safetensors
    return code is not None and (code not in PER_ITEM or len(t.shape) > 0)


def _torch_shape(code: str, shape: tuple) -> tuple | None:
    per = PER_ITEM.get(code, 1)
    if per == 1:
        return shape
    if not shape or shape[-1] % per:
        return None
    return (*shape[:-1], shape[-1] // per)


def _no_duplicates(pairs: list, duplicates: list[str]) -> dict:
    """A JSON object, noting every key that appears twice (the first value is kept, as Rust's serde does)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            duplicates.append(key)
            continue
        out[key] = value
    return out


def _entry(info) -> tuple[DType, tuple, tuple[int, int]] | None:
    """(dtype, shape, offsets) of a header entry, or None when it is not a valid tensor description."""
    if not isinstance(info, dict) or info.get("dtype") not in FROM_SAFETENSORS:
        return None
    shape, offsets = info.get("shape"), info.get("data_offsets")

    def ints(xs) -> bool:
        return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)

    if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        return None
    torch_shape = _torch_shape(info["dtype"], tuple(shape))
    if torch_shape is None:
        return None
    return DType(FROM_SAFETENSORS[info["dtype"]]), torch_shape, (offsets[0], offsets[1])


def read(path: Path) -> Checkpoint:
    ckpt = Checkpoint(path, NAME)
    size = path.stat().st_size
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise NotACheckpoint(f"{path}: safetensors header length {n} runs past the end of the file ({size} bytes)")
        duplicates: list[str] = []
        try:
            header = json.loads(f.read(n), object_pairs_hook=lambda pairs: _no_duplicates(pairs, duplicates))
        except ValueError as exc:  # UnicodeDecodeError included
            raise NotACheckpoint(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise NotACheckpoint(f"{path}: safetensors header is not a JSON object")
    for name in duplicates:
        ckpt.findings.append(
            Finding(ERROR, "safetensors.duplicate-name", f"{name!r} appears twice in the header", name)
        )
    base = 8 + n
    ckpt.metadata = dict(header.pop("__metadata__", None) or {})
    tree, spans = {}, []
    for name, info in header.items():
        entry = _entry(info)
        if entry is None:
            ckpt.findings.append(
                Finding(
                    ERROR,
                    "safetensors.bad-entry",
                    f"{name}: {str(info)[:80]} is not a tensor description (dtype, shape, data_offsets)",
                    name,
                )
            )
            continue
        dtype, shape, (start, end) = entry
        numel = 1
        for s in shape:
            numel *= s
        if (end - start) != numel * dtype.itemsize:
            ckpt.findings.append(
                Finding(
                    ERROR,
                    "safetensors.size-mismatch",
                    f"{name}: {end - start} bytes for {dtype} {list(shape)} (needs {numel * dtype.itemsize})",
                    name,
                )
            )
        if base + end > size:
            ckpt.findings.append(
                Finding(
                    ERROR, "safetensors.truncated", f"{name}: data ends at {base + end}, file has {size} bytes", name
                )
            )
        spans.append((start, end, name))
        ref = StorageRef(name, dtype, numel, "cpu", None)
        ref.reader = lambda r, s=start, e=end: b"".join(_iter_file_range(path, base + s, e - s, CHUNK))
        ckpt.storages[name] = ref
        tree[name] = LazyTensor(ref, 0, shape, contiguous_strides(shape))
    spans.sort()
    for (_, e1, n1), (s2, _, n2) in zip(spans, spans[1:]):
        if s2 < e1:
            ckpt.findings.append(Finding(ERROR, "safetensors.overlap", f"{n1} and {n2} overlap in the data area", n2))
    ckpt.tree = tree

    def iter_storage(ref: StorageRef, chunk: int):
        start, end = header[ref.key]["data_offsets"]
        yield from _iter_file_range(path, base + start, end - start, chunk)

    ckpt.iter_storage = iter_storage
    return ckpt


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


def write_safetensors(
    tensors: dict[str, LazyTensor],
    out: IO[bytes],
    tensor_chunks: Callable[[LazyTensor], Iterable[bytes]],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write ``tensors`` (every dtype must have a safetensors code: ``writable``) with string ``metadata``."""
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        code = DType(t.dtype).info.safetensors
        shape = list(t.shape[:-1]) + [t.shape[-1] * PER_ITEM[code]] if code in PER_ITEM else list(t.shape)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data area starts 8-byte aligned, as the library writes it
    out.write(struct.pack("<Q", len(raw)) + raw)
    for name, t in tensors.items():
        written = 0
        for block in tensor_chunks(t):
            out.write(block)
            written += len(block)
            if on_bytes:
                on_bytes(len(block))
        if written != t.nbytes:
            raise OSError(f"tensor {name}: {written} bytes read, {t.nbytes} expected")


def write_converted(weights: dict, request: WriteRequest) -> None:
    """`ckpt convert`'s entry (formats/base.py): named tensors only (the caller picks the weights); anything
    else, or a dtype safetensors has no code for, is refused with every name."""
    refuse_unwritable(weights, request, "safetensors", writable)
    held = [k for k, v in weights.items() if not isinstance(v, LazyTensor)]
    if held:
        raise FormatLimit(
            f"{request.input_name}: safetensors holds named tensors only, and {len(held)} weight "
            f"entr{'y' if len(held) == 1 else 'ies'} hold tensors inside a container: "
            f"{', '.join(held[:8])}; nothing written (.pt keeps them)",
            held,
        )
    with atomic_write(request.out, replace=request.replace) as f:
        write_safetensors(weights, f, request.source.tensor_chunks, request.metadata, request.on_bytes)
