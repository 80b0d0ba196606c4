"""What convert, remap and repair share: where a tensor's bytes come from, output-path rules, the
content digest, and turning a tree into what a target format can hold."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ckpttools import layouts as L
from ckpttools.atomic import atomic_write, fsync_dir
from ckpttools.digest import DIGEST_KEY, _TensorLeaf, digest_record, tree_digest
from ckpttools.reader import Checkpoint
from ckpttools.report import ERROR, UsageProblem
from ckpttools.scan import tensor_bytes
from ckpttools.unpickle import DType, LazyTensor, Placeholder, StorageRef, contiguous_strides

FLOATING = {"float64", "float32", "float16", "bfloat16"}


class Source:
    """Bytes of storages and tensors: read from the checkpoint, or computed (a cast, a filled-in tensor)."""

    def __init__(self, ckpt: Checkpoint | None = None):
        self.ckpt = ckpt
        self.computed: dict[int, Callable[[], bytes]] = {}

    def storage_chunks(self, ref: StorageRef) -> Iterable[bytes]:
        if id(ref) in self.computed:
            return [self.computed[id(ref)]()]
        return self.ckpt.storage_chunks(ref)

    def tensor_chunks(self, t: LazyTensor) -> Iterator[bytes]:
        return tensor_bytes(t, self.storage_chunks(t.storage))

    def computed_tensor(self, dtype: str, shape: tuple[int, ...], make: Callable[[], bytes], location="cpu") -> LazyTensor:
        """A new contiguous tensor whose bytes ``make()`` produces when it is written."""
        numel = 1
        for s in shape:
            numel *= s
        ref = StorageRef(f"computed-{len(self.computed)}", DType(dtype), numel, location)
        self.computed[id(ref)] = make
        return LazyTensor(ref, 0, tuple(shape), contiguous_strides(shape))


# ---- outputs ----------------------------------------------------------------------------------------------------

def check_output(out: Path, inputs: Iterable[Path], force: bool) -> None:
    """Outputs go to a new path: never an input, never an existing file unless --force."""
    for src in inputs:
        if src.exists() and out.exists() and out.resolve() == src.resolve():
            raise UsageProblem(f"{out}: is the input; write the result to a new path (inputs are never modified)")
    if out.exists() and not force:
        raise UsageProblem(f"{out}: already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise UsageProblem(f"{out.parent}: no such folder for the output")


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces it only when the body finishes."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_pt(tree: Any, out: Path, source: Source, location=None, on_bytes=None) -> None:
    from ckpttools.torchsave import write_torch_zip

    with atomic_write(out) as f:
        write_torch_zip(tree, f, source.storage_chunks, location=location, on_bytes=on_bytes)


# ---- inputs -----------------------------------------------------------------------------------------------------

def refuse_dangerous(ckpt: Checkpoint, what: str) -> None:
    """Never copy a reference to dangerous code into an output (the writers write references back by name)."""
    from ckpttools.verify import reference_status

    dangerous = [r.qualname for r in ckpt.references if reference_status(r) == "dangerous"]
    if dangerous:
        raise UsageProblem(f"{ckpt.path}: names dangerous code ({', '.join(dangerous[:3])}); refusing to {what} it "
                           "(see `ckpt verify`)")


def require_readable(ckpt: Checkpoint, what: str = "convert") -> None:
    """Refuse a damaged or hostile input with one line that says what to run instead."""
    refuse_dangerous(ckpt, what)
    errors = [f for f in ckpt.findings if f.severity == ERROR]
    if errors or ckpt.tree is None:
        first = errors[0].message if errors else "nothing could be read"
        raise UsageProblem(f"{ckpt.path}: damaged ({len(errors)} problem(s), first: {first}); "
                           f"run `ckpt verify` / `ckpt repair` first")


# ---- the digest ---------------------------------------------------------------------------------------------------

def lazy_digest(tree: Any, source: Source) -> str:
    def leaf(value: Any):
        if not isinstance(value, LazyTensor):
            return None
        return _TensorLeaf(value.dtype, value.shape, lambda v=value: source.tensor_chunks(v))
    return tree_digest(tree, leaf)


def refresh_digest(tree: Any, source: Source) -> bool:
    """Recompute the tree's recorded digest after its content changed; False when it records none."""
    if not (isinstance(tree, dict) and DIGEST_KEY in tree):
        return False
    record = digest_record({})
    record["value"] = lazy_digest(tree, source)
    tree[DIGEST_KEY] = record
    return True


# ---- reshaping trees ---------------------------------------------------------------------------------------------

def map_tensors(tree: Any, fn: Callable[[LazyTensor], Any]) -> Any:
    """A copy of the tree's containers with every LazyTensor replaced by ``fn(tensor)``."""
    if isinstance(tree, LazyTensor):
        return fn(tree)
    if isinstance(tree, dict):
        return type(tree)((k, map_tensors(v, fn)) for k, v in tree.items()) if type(tree) is not dict \
            else {k: map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_tensors(v, fn) for v in tree]
    if isinstance(tree, tuple):
        return tuple(map_tensors(v, fn) for v in tree)
    if isinstance(tree, Placeholder):
        for attr in ("_state", "_args", "_items", "_dict_items"):
            tree.__dict__[attr] = map_tensors(tree.__dict__[attr], fn)
        return tree
    return tree


def cast_floats(tree: Any, dtype: str, source: Source) -> tuple[Any, int]:
    """Floating tensors cast to ``dtype`` (computed one at a time when written); returns (tree, count)."""
    import torch

    count = 0

    def cast(t: LazyTensor):
        nonlocal count
        if t.dtype not in FLOATING or t.dtype == dtype:
            return t
        count += 1

        def make(t=t) -> bytes:
            x = t.load().to(getattr(torch, dtype)).contiguous()
            return x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""
        out = source.computed_tensor(dtype, t.shape, make, t.storage.location)
        out.requires_grad, out.parameter = t.requires_grad, t.parameter
        return out

    return map_tensors(tree, cast), count


def representable(tree: Any, notes: list[str], where: str = "") -> Any:
    """The tree with what only a pickle can hold (objects of classes never imported, torch dtypes) turned into
    plain data a non-pickle format can store; every change is noted."""
    if isinstance(tree, dict):
        return {k: representable(v, notes, f"{where}/{k}" if where else str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [representable(v, notes, f"{where}[{i}]") for i, v in enumerate(tree)]
    if isinstance(tree, tuple):
        return tuple(representable(v, notes, f"{where}[{i}]") for i, v in enumerate(tree))
    if isinstance(tree, DType):
        return f"torch.{tree}"
    if isinstance(tree, Placeholder):
        name = tree._reference.qualname
        weights = L.module_tensors(tree)
        if weights:
            notes.append(f"{where or 'root'}: pickled {name} stored as its state dict ({len(weights)} tensors); "
                         "the class itself is not carried")
            return weights
        state = tree.state
        notes.append(f"{where or 'root'}: pickled {name} stored as its recorded attributes")
        return representable(state if isinstance(state, (dict, list, tuple)) else {}, notes, where)
    if isinstance(tree, type) and issubclass(tree, Placeholder):
        notes.append(f"{where}: reference to {tree._reference.qualname} stored as its name")
        return tree._reference.qualname
    return tree


def materialise(tree: Any) -> Any:
    """LazyTensors loaded as torch tensors (for APIs that need real tensors, e.g. DCP's save)."""
    return map_tensors(tree, lambda t: t.load())
