"""Walks over a reader's tree of plain values, placeholders and lazy tensors: every tensor with its path, every
node of some types, the depth, a copy with each tensor mapped, rebuilt tensors expanded.  Each walk enters a
container once however many names it has (the tree is a graph: a pickle's memo lets ``x = [x, x]`` 64 times name
one list 2**64 ways in 4 kB), so the work is the number of objects, never the number of paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ckpttools.objects import Placeholder
from ckpttools.tensors import LazyTensor, RebuiltTensor


def _children(node: Any, prefix: str) -> list[tuple[str, Any]]:
    """(path, child) of one container, in order; placeholder objects through their recorded state."""
    if isinstance(node, dict):
        return [(f"{prefix}/{k}" if prefix else str(k), v) for k, v in node.items()]
    if isinstance(node, (list, tuple)):
        return [(f"{prefix}[{i}]", v) for i, v in enumerate(node)]
    if isinstance(node, Placeholder):
        return [(prefix, part) for part in (node._state, node._args, node._items, node._dict_items) if part]
    if isinstance(node, RebuiltTensor):
        return [(f"{prefix}<{node.kind}>", node.args)]
    return []


def iter_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, LazyTensor]]:
    """(path, tensor) for every LazyTensor in the tree (see ``iter_nodes``)."""
    return iter_nodes(tree, LazyTensor, prefix)


def iter_nodes(
    tree: Any, kind: type | tuple[type, ...], prefix: str = "", inside_found: bool = True
) -> Iterator[tuple[str, Any]]:
    """(path, node) for every node of type ``kind`` in the tree, paths like ``model/backbone.stem.0.weight``;
    placeholder objects are walked through their recorded state, rebuilt tensors through their arguments.

    Bounded by construction: a pickle's memo lets one container appear under many names (``x = [x, x]`` 64
    times is 2**64 paths in 4 kB), so every container is entered once, at its first path, and the walk is a
    loop, not a recursion (no depth limit).  A tensor is still yielded for every key that holds it
    (``{"a": t, "b": t}`` has two names), and so is any node of ``kind``; a container met again is not walked
    again.  ``inside_found=False``: what a found node holds is not searched (a rebuilt tensor, not its parts)."""
    entered: set[int] = set()
    stack: list[tuple[str, Any]] = [(prefix, tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, kind):
            yield path, node
            if not inside_found:
                continue
        if isinstance(node, LazyTensor) or id(node) in entered:
            continue
        children = _children(node, path)
        if children:
            entered.add(id(node))
            stack.extend(reversed(children))  # reversed: popped in order, so paths come out as before


def depth_of(tree: Any, stop_at: int | None = None) -> int:
    """How deeply containers nest (a tensor or plain value: 0), without recursion; each container entered
    once.  ``stop_at``: return as soon as that depth is reached."""
    deepest, entered = 0, set()
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, LazyTensor) or id(node) in entered:
            continue
        children = _children(node, "")
        if children:
            entered.add(id(node))
            deepest = max(deepest, depth + 1)
            if stop_at is not None and deepest >= stop_at:
                return deepest
            stack.extend((child, depth + 1) for _, child in children)
    return deepest


def map_tensors(tree: Any, fn: Callable[[LazyTensor], Any], _done: dict | None = None) -> Any:
    """A copy of the tree's containers with every LazyTensor replaced by ``fn(tensor)``.  A container that
    appears several times is copied once and the copy shared the same way (the work is the number of
    containers, not of paths; a tensor object met twice is mapped once)."""
    done = {} if _done is None else _done
    if id(tree) in done:
        return done[id(tree)][1]
    if isinstance(tree, LazyTensor):
        out = fn(tree)
    elif isinstance(tree, dict):
        out = type(tree)() if type(tree) is not dict else {}
        done[id(tree)] = (tree, out)  # the original is kept alive so its id is not reused meanwhile
        for k, v in tree.items():
            out[k] = map_tensors(v, fn, done)
        return out
    elif isinstance(tree, list):
        out = []
        done[id(tree)] = (tree, out)
        out.extend(map_tensors(v, fn, done) for v in tree)
        return out
    elif isinstance(tree, tuple):
        out = tuple(map_tensors(v, fn, done) for v in tree)
    elif isinstance(tree, Placeholder):
        done[id(tree)] = (tree, tree)
        for attr in ("_state", "_args", "_items", "_dict_items"):
            tree.__dict__[attr] = map_tensors(tree.__dict__[attr], fn, done)
        return tree
    elif isinstance(tree, RebuiltTensor):
        out = RebuiltTensor(tree.function, map_tensors(tree.args, fn, done))
    else:
        return tree
    done[id(tree)] = (tree, out)
    return out


def materialise(tree: Any) -> Any:
    """LazyTensors loaded as torch tensors (for APIs that need real tensors, e.g. DCP's save)."""
    return map_tensors(tree, lambda t: t.load())


def expand_rebuilt(flat: dict[str, Any]) -> dict[str, LazyTensor]:
    """A flat name -> tensor dict with every rebuilt tensor replaced by its LazyTensor parts, named
    ``NAME<kind>[i]`` (for the commands that compare or check bytes tensor by tensor).  Where nothing is rebuilt
    it is ``flat`` itself: read it, do not change it."""
    if not any(isinstance(t, RebuiltTensor) for t in flat.values()):
        return flat  # nothing to expand: the same dict, not a copy (200,000 entries in an optimizer's state)
    out: dict[str, LazyTensor] = {}
    for name, t in flat.items():
        if isinstance(t, RebuiltTensor):
            out.update(iter_tensors(t, name))
        else:
            out[name] = t
    return out
