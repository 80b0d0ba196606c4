"""A content digest of a checkpoint that does not depend on the container it is stored in.

The digest hashes the checkpoint's *tree*: every dict key, every plain value, and every tensor's dtype,
shape and element bytes, walked in a canonical order.  It is therefore the same for a ``.pt`` file and its
HDF5 or safetensors conversion, and ``ckpt verify`` can recompute it from the safe reader without running
``torch.load``.  The writer stores it under ``DIGEST_KEY``; that key is left out of the hash.  The same tree
gives the same digest from torch's values (a trainer's live state) and from the safe reader's (``ckpt
verify``): torch's named constants (dtypes, layouts, devices, qschemes) are hashed by the name the reader gives
them (``tests/test_digest.py`` checks it on generated trees).

Two versions are read; v2 is written:

* ``xxh3-128-tree-v1``: a tensor contributes its bytes to the one running hash, so tensors are hashed one after
  the other;
* ``xxh3-128-tree-v2``: a tensor contributes the xxh3-128 of its bytes, so every tensor can be hashed on its
  own core, in the same pass that checks its CRC32 and values (``ckpt verify`` does that).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

from ckpttools.objects import is_placeholder
from ckpttools.tensors import LazyTensor

DIGEST_KEY = "digest"
DIGEST_V1, DIGEST_V2 = "xxh3-128-tree-v1", "xxh3-128-tree-v2"
DIGEST_ALGORITHM = DIGEST_V2  # what writers record
KNOWN_ALGORITHMS = (DIGEST_V1, DIGEST_V2)
# xxh3-128 hashes at memory speed; a cryptographic hash would dominate `ckpt verify` on large files and buy
# nothing: anyone who can rewrite the file can recompute any unkeyed digest.  This detects damage.


class _TensorLeaf:
    """What the walker needs of a tensor: dtype name, shape, a way to stream its bytes, and (v2) the xxh3-128 of
    those bytes when it is already known."""

    __slots__ = ("dtype", "shape", "chunks", "known_hash")

    def __init__(
        self, dtype: str, shape: tuple[int, ...], chunks: Callable[[], Iterable[bytes]], known_hash: bytes | None = None
    ):
        self.dtype, self.shape, self.chunks, self.known_hash = dtype, tuple(shape), chunks, known_hash

    def hash(self) -> bytes:
        import xxhash

        if self.known_hash is not None:
            return self.known_hash
        h = xxhash.xxh3_128()
        for chunk in self.chunks():
            h.update(chunk)
        return h.digest()


def _torch_tensor_leaf(value: Any) -> _TensorLeaf | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not isinstance(value, torch.Tensor):
        return None
    dtype = str(value.dtype).removeprefix("torch.")

    def chunks() -> Iterable[bytes]:
        t = value.detach().cpu().contiguous()
        if t.numel():
            yield memoryview(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own memory: no copy

    return _TensorLeaf(dtype, tuple(value.shape), chunks)


def tree_digest(
    tree: Any, tensor_leaf: Callable[[Any], _TensorLeaf | None] = _torch_tensor_leaf, algorithm: str = DIGEST_ALGORITHM
) -> str:
    """Hex digest of ``tree`` (dicts, lists, tuples, scalars, strings, tensors) by ``algorithm``, skipping
    ``DIGEST_KEY`` at the top level.  ``tensor_leaf`` turns a tensor-like value into a ``_TensorLeaf``; readers
    that hold lazy tensors pass their own."""
    import xxhash

    if algorithm not in KNOWN_ALGORITHMS:
        raise ValueError(f"unknown digest algorithm {algorithm!r}")
    h = xxhash.xxh3_128()
    walk = _Walk(h, tensor_leaf, per_leaf=algorithm == DIGEST_V2)
    walk.value(tree, top=True)
    walk.flush()
    return h.hexdigest()


def _key_order(key: Any) -> tuple[str, str]:
    return (type(key).__name__, repr(key))


_F64 = struct.Struct("<d").pack


def _torch_name(value: Any) -> str | None:
    """The name a torch constant is hashed by: the one the safe reader gives it (``DType``, ``TorchLayout``,
    ``TorchConstant``, a device's string), or, for a ``torch`` global the reader does not know (a dtype newer
    than its table), the global's name.  So the digest of a tree is the same from torch.load's values and from
    the reader's, and a file is not called changed for holding a dtype."""
    kind = type(value)
    if kind.__module__ == "torch" and kind.__name__ in ("dtype", "qscheme", "memory_format"):
        return str(value).removeprefix("torch.")
    if kind.__module__ == "torch" and kind.__name__ in ("layout", "device"):
        return str(value)
    if is_placeholder(value) and value._reference.module == "torch":
        return value._reference.name
    return None


class _Walk:
    """The digest's byte stream: every value's tag and bytes in the canonical order, gathered in pieces and
    hashed in large updates (the stream defines the digest, not how it is cut: a tree of 2,000 tensors is some
    10,000 pieces, and an update call each cost more than the bytes)."""

    def __init__(self, h, tensor_leaf, per_leaf: bool):
        self.h, self.tensor_leaf, self.per_leaf = h, tensor_leaf, per_leaf
        self.parts: list[bytes] = []

    def flush(self) -> None:
        if self.parts:
            self.h.update(b"".join(self.parts))
            self.parts.clear()

    def value(self, value: Any, top: bool = False) -> None:
        out = self.parts.append
        kind = type(value)
        # the most common kinds first, by exact type (a tensor-like value is never one of them)
        if kind is str:
            self.text(value)
        elif kind is int:
            out(b"I%d|" % value)
        elif kind is dict:
            self.mapping(value, top)
        elif value is None:
            out(b"N|")
        elif kind is list or kind is tuple:
            self.sequence(value)
        else:
            self.other(value, top)

    def text(self, value: str) -> None:
        data = value.encode("utf-8", "surrogatepass")
        self.parts.append(b"S%d|" % len(data))
        self.parts.append(data)

    def mapping(self, value: dict, top: bool) -> None:
        items = [(k, v) for k, v in value.items() if not (top and k == DIGEST_KEY)]
        self.parts.append(b"D%d|" % len(items))
        for k, v in sorted(items, key=lambda kv: _key_order(kv[0])):
            self.value(k)
            self.value(v)

    def sequence(self, value: list | tuple) -> None:
        self.parts.append((b"L" if isinstance(value, list) else b"U") + b"%d|" % len(value))
        for item in value:
            self.value(item)

    def other(self, value: Any, top: bool) -> None:
        """Tensors, floats, booleans, subclasses of the plain kinds, and everything else."""
        out = self.parts.append
        leaf = self.tensor_leaf(value)
        if leaf is not None:
            out(b"T" + leaf.dtype.encode() + b"|" + repr(leaf.shape).encode() + b"|")
            if self.per_leaf:
                out(leaf.hash())
            else:  # v1: the tensor's bytes in the stream itself
                self.flush()
                for chunk in leaf.chunks():
                    self.h.update(chunk)
            return
        value = _torch_name(value) or value
        if isinstance(value, dict):
            self.mapping(value, top)
        elif isinstance(value, (list, tuple)):
            self.sequence(value)
        elif isinstance(value, bool):
            out(b"B1|" if value else b"B0|")
        elif isinstance(value, int):
            out(b"I" + str(value).encode() + b"|")
        elif isinstance(value, float):
            out(b"F" + _F64(value))
        elif isinstance(value, str):
            self.text(value)
        elif isinstance(value, (bytes, bytearray)):
            out(b"Y%d|" % len(value) + bytes(value))
        else:
            # Anything else (a placeholder for a pickled class) is hashed by its printed form.
            text = f"{type(value).__module__}.{type(value).__qualname__}:{value!r}".encode()
            out(b"O%d|" % len(text) + text)


def digest_record(tree: Any) -> dict[str, str]:
    """The value stored under ``DIGEST_KEY``."""
    return {"algorithm": DIGEST_ALGORITHM, "value": tree_digest(tree)}


def lazy_digest(tree: Any, source, algorithm: str = DIGEST_ALGORITHM) -> str:
    """The digest of a reader tree whose tensors are LazyTensors, their bytes from ``source``
    (a ``tensors.TensorSource``)."""

    def leaf(value: Any):
        if not isinstance(value, LazyTensor):
            return None
        return _TensorLeaf(value.dtype, value.shape, lambda v=value: source.tensor_chunks(v))

    return tree_digest(tree, leaf, algorithm)


def refresh_digest(tree: Any, source) -> bool:
    """Recompute the tree's recorded digest after its content changed; False when it records none."""
    if not (isinstance(tree, dict) and DIGEST_KEY in tree):
        return False
    record = digest_record({})
    record["value"] = lazy_digest(tree, source)
    tree[DIGEST_KEY] = record
    return True
