"""``torch.save``'s file, written from live CPU tensors by our own zip writer.

Why: ``torch.save`` holds Python's GIL for the whole write (its pickler, its CRC32 and its calls into a Python
file object all run under it), so a trainer saving from a background thread could block its own training thread
for as long as the write takes.  This writer releases the GIL for the bytes (ISA-L's CRC32 and the file's
``write`` work on large buffers without it).  Measured on 2 cores (bench/save_bench.py --breakdown, 5 alternated
rounds) the steps beside a writer slowed alike either way (+5 % vs +8 %, within the spread): what it buys there
is a faster write (scale s 321 vs 388 ms) through ``zipwriter``'s CRC32.

Here the tree's tensors become the reader's ``LazyTensor`` / ``StorageRef`` descriptions over the tensors' own
memory (no copy), ``torchzip.write_torch_zip`` pickles the structure (the C pickler: milliseconds) and streams
each storage as a memoryview.
The file is what ``torch.save`` writes (same records, alignment and rebuild calls; ``torch.load`` with
``weights_only=True`` reads it back equal, tested over every dtype).  A tree holding anything else than plain
data and dense CPU tensors (a module, a numpy array, a tensor subclass, a quantized or sparse tensor, a storage
viewed as two dtypes) is written by ``torch.save`` itself.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import IO, Any

from ckpttools.formats.torchzip import write_torch_zip
from ckpttools.tensors import DTYPES, LazyTensor, StorageRef, contiguous_strides

PLAIN = (str, int, float, bool, bytes, type(None))


class _NotPlain(Exception):
    """The tree holds something only torch.save writes."""


def save(tree: Any, out: IO[bytes], own_storage: Callable[[Any], memoryview | None] | None = None) -> bool:
    """Write ``tree`` to the seekable binary ``out`` as ``torch.save`` would.  False (nothing written) when the
    tree holds something this writer leaves to ``torch.save``.  ``own_storage``: as for ``describe``."""
    try:
        described, memory = describe(tree, own_storage)
    except _NotPlain:
        return False
    write_torch_zip(described, out, lambda ref: memory[id(ref)])
    return True


def _plain_dtype(t, torch) -> str:
    """The dtype name of a dense CPU tensor this writer writes; _NotPlain for anything else.  (``torch``: passed
    by ``describe``, which imports it when called: importing this module loads no torch.)"""
    if (
        type(t) not in (torch.Tensor, torch.nn.Parameter)
        or t.layout != torch.strided
        or t.device.type != "cpu"
        or t.is_quantized
        or t.is_conj()
        or t.is_neg()
        or getattr(t, "__dict__", None)  # attributes set on the tensor: torch.save pickles them
        or str(t.dtype).removeprefix("torch.") not in DTYPES
    ):
        raise _NotPlain(type(t).__name__)
    return str(t.dtype).removeprefix("torch.")


def describe(
    tree: Any, own_storage: Callable[[Any], memoryview | None] | None = None, known: dict | None = None
) -> tuple[Any, dict[int, Iterable[memoryview]]]:
    """(the tree with each tensor as a LazyTensor, {id(StorageRef): [its bytes as a memoryview]}).  Containers
    shared within the tree stay shared (the pickler then writes them once, as torch.save does).  Raises
    _NotPlain for what this writer does not write.  ``own_storage(t)``: the bytes of a tensor that is written as
    a storage of its own although it is a view of a larger one (a slot of ``zipimage``'s arena), else None.
    ``known``: descriptions of such slots kept from save to save (the same tensor objects every time, only their
    values change), so a snapshot's 2,000 tensors are not examined again at every save."""
    import torch

    storages: dict[tuple[int, int], StorageRef] = {}
    memory: dict[int, Iterable[memoryview]] = {}
    seen: dict[int, Any] = {}

    def tensor(t: torch.Tensor) -> LazyTensor:
        hit = known.get(id(t)) if known is not None else None
        if hit is not None and hit[0] is t:  # (the tensor is held by ``known``: its id cannot be reused)
            memory[id(hit[1].storage)] = hit[2]
            return hit[1]
        dtype = _plain_dtype(t, torch)
        parameter = isinstance(t, torch.nn.Parameter)
        slot = own_storage(t) if own_storage is not None else None
        if slot is not None:  # a storage of exactly this tensor's bytes
            ref = StorageRef(str(len(storages)), dtype, t.numel(), "cpu")
            storages[(id(t), -1)] = ref
            memory[id(ref)] = [slot] if slot.nbytes else []
            shape = tuple(t.shape)
            lazy = LazyTensor(ref, 0, shape, contiguous_strides(shape), t.requires_grad, parameter)
            if known is not None:
                known[id(t)] = (t, lazy, memory[id(ref)])
            return lazy
        untyped = t.untyped_storage()
        nbytes = untyped.nbytes()
        key = (untyped.data_ptr(), nbytes) if nbytes else (id(t), 0)
        ref = storages.get(key)
        if ref is None:
            itemsize = t.element_size()
            if nbytes % itemsize:
                raise _NotPlain("a storage that is not whole elements")
            ref = storages[key] = StorageRef(str(len(storages)), dtype, nbytes // itemsize, "cpu")
            raw = torch.empty(0, dtype=torch.uint8).set_(untyped, 0, (nbytes,), (1,))
            memory[id(ref)] = [memoryview(raw.numpy())] if nbytes else []
        elif ref.dtype != dtype:
            raise _NotPlain("one storage viewed as two dtypes")  # torch.save refuses it too
        return LazyTensor(ref, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.requires_grad, parameter)

    def walk(value: Any) -> Any:
        if isinstance(value, PLAIN):
            return value
        if id(value) in seen:
            return seen[id(value)]
        if isinstance(value, torch.Tensor):
            out = tensor(value)
        elif type(value) in (dict, collections.OrderedDict):
            out = type(value)()
            seen[id(value)] = out
            for k, v in value.items():
                out[walk(k)] = walk(v)
        elif type(value) is list:
            out = []
            seen[id(value)] = out
            out.extend(walk(v) for v in value)
        elif type(value) is tuple:
            out = tuple(walk(v) for v in value)
        else:
            raise _NotPlain(type(value).__name__)
        seen[id(value)] = out
        return out

    return walk(tree), memory
