"""A content digest of a checkpoint that does not depend on the container it is stored in.

The digest hashes the checkpoint's *tree*: every dict key, every plain value, and every tensor's dtype,
shape and element bytes, walked in a canonical order.  It is therefore the same for a ``.pt`` file and its
HDF5 or safetensors conversion, and ``ckpt verify`` can recompute it from the safe reader without running
``torch.load``.  The writer stores it under ``DIGEST_KEY``; that key is left out of the hash.

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
    _feed(h, tree, tensor_leaf, top=True, per_leaf=algorithm == DIGEST_V2)
    return h.hexdigest()


def _key_order(key: Any) -> tuple[str, str]:
    return (type(key).__name__, repr(key))


def _feed(h, value: Any, tensor_leaf, top: bool = False, per_leaf: bool = True) -> None:
    leaf = tensor_leaf(value)
    if leaf is not None:
        h.update(b"T" + leaf.dtype.encode() + b"|" + repr(leaf.shape).encode() + b"|")
        if per_leaf:
            h.update(leaf.hash())
        else:
            for chunk in leaf.chunks():
                h.update(chunk)
        return
    if isinstance(value, dict):
        items = [(k, v) for k, v in value.items() if not (top and k == DIGEST_KEY)]
        h.update(b"D%d|" % len(items))
        for k, v in sorted(items, key=lambda kv: _key_order(kv[0])):
            _feed(h, k, tensor_leaf, per_leaf=per_leaf)
            _feed(h, v, tensor_leaf, per_leaf=per_leaf)
    elif isinstance(value, (list, tuple)):
        h.update((b"L" if isinstance(value, list) else b"U") + b"%d|" % len(value))
        for item in value:
            _feed(h, item, tensor_leaf, per_leaf=per_leaf)
    elif value is None:
        h.update(b"N|")
    elif isinstance(value, bool):
        h.update(b"B1|" if value else b"B0|")
    elif isinstance(value, int):
        h.update(b"I" + str(value).encode() + b"|")
    elif isinstance(value, float):
        h.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"S%d|" % len(data) + data)
    elif isinstance(value, (bytes, bytearray)):
        h.update(b"Y%d|" % len(value) + bytes(value))
    else:
        # Anything else (a dtype, a placeholder for a pickled class) is hashed by its printed form.
        text = f"{type(value).__module__}.{type(value).__qualname__}:{value!r}".encode()
        h.update(b"O%d|" % len(text) + text)


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
