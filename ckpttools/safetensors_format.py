"""Write safetensors files one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; the format itself is simple (an
8-byte header length, a JSON header of name -> dtype / shape / byte range, then the bytes), so this writes it
streaming, and the result is read by ``safetensors.torch.load_file`` like any other (a test checks that).
"""

from __future__ import annotations

import json
import struct
from typing import IO, Callable, Iterable

from ckpttools.unpickle import LazyTensor

TO_SAFETENSORS = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                  "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "uint16": "U16", "uint32": "U32",
                  "uint64": "U64", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def write_safetensors(tensors: dict[str, LazyTensor], out: IO[bytes],
                      tensor_chunks: Callable[[LazyTensor], Iterable[bytes]], metadata: dict[str, str] | None = None,
                      on_bytes: Callable[[int], None] | None = None) -> None:
    """Write ``tensors`` (every dtype must be in TO_SAFETENSORS) with string ``metadata``."""
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": TO_SAFETENSORS[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
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
