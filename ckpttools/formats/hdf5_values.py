"""Plain values in HDF5 attributes: what is stored as an attribute, and tagged JSON for the values HDF5 has no
type for (None, tuples, bytes, dicts with other keys, non-finite floats); read back exactly (``untag``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ckpttools.tensors import LazyTensor


def tag(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [tag(v) for v in value]}
    if isinstance(value, list):
        return [tag(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": bytes(value).hex()}
    if isinstance(value, dict):
        return {"__dict__": [[tag(k), tag(v)] for k, v in value.items()]}
    if isinstance(value, np.generic):
        return tag(value.item())
    raise TypeError(type(value).__name__)


def untag(value: Any) -> Any:
    if isinstance(value, list):
        return [untag(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(untag(v) for v in value["__tuple__"])
        if "__bytes__" in value:
            return bytes.fromhex(value["__bytes__"])
        if "__float__" in value:
            return float(value["__float__"])
        if "__dict__" in value:
            return {untag(k): untag(v) for k, v in value["__dict__"]}
    return value


def is_plain(value: Any, shared: frozenset | set = frozenset()) -> bool:
    """A value that is stored as an attribute (no tensors or arrays inside, no container in ``shared``: a
    container that appears more than once is a group, written once and hard-linked)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, bytearray, np.generic)):
        return True
    if isinstance(value, (list, tuple)):
        return id(value) not in shared and all(is_plain(v, shared) for v in value)
    return False  # dicts become groups, tensors and arrays datasets


def shared_objects(tree: Any) -> set[int]:
    """ids of the containers and tensors that the tree reaches more than once (a pickle's memo makes them:
    ``x = [x, x]`` 64 times is 2**64 paths in 4 kB).  One pass; each container is entered once."""
    seen: set[int] = set()
    shared: set[int] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, (dict, list, tuple, LazyTensor)):
            continue
        if id(node) in seen:
            shared.add(id(node))
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return shared


def plain(value: Any) -> Any:
    """An HDF5 attribute as a Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    if type(value).__name__ == "Empty":  # h5py.Empty: an attribute without data
        return None
    return value
