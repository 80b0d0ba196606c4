"""The pickle of a torch.save file, written without torch: ``pickle_tree`` turns a tree of plain values and
lazy tensors into the ``data.pkl`` bytes torch.save would write (persistent ids for storages, torch's rebuild
calls for tensors and Parameters, placeholders and rebuilt tensors by name) and lists the storages in key
order.  The C pickler writes it where it can (torch's names through ``torch_names``), the pure-Python one,
which writes any name, where it cannot: the same bytes either way (tests/test_fast_writer.py).
``torchzip.write_torch_zip`` lays the records out around it.
"""

from __future__ import annotations

import collections
import copyreg
import io
import pickle
from collections.abc import Callable
from typing import IO, Any

from ckpttools.formats import torch_names
from ckpttools.objects import Placeholder, Reference, is_placeholder
from ckpttools.tensors import DTYPES, DType, LazyTensor, RebuiltTensor, StorageRef, TorchConstant, TorchLayout

NAME = "torch-zip"
MAX_EXTRA_PICKLE = 256 << 20  # scan other pickle records up to this size


PROTOCOL = 2  # torch.save's default
# typed storages: what torch names a storage of these dtypes by (quantized ones only inside _rebuild_qtensor,
# which takes its dtype from the storage); tensors of other dtypes are v3 rebuilds over an UntypedStorage
TYPED_STORAGE = {d.name: d.storage_class for d in DTYPES.values() if d.storage_class}
STORAGE_CLASS = {name: cls for name, cls in TYPED_STORAGE.items() if not name.startswith(("qint", "quint"))}


class Global:
    """A module-level name written into the pickle by reference, never imported here."""

    _cache: dict[tuple[str, str], Global] = {}

    def __new__(cls, module: str, name: str):
        key = (module, name)
        if key not in cls._cache:
            obj = super().__new__(cls)
            obj.module, obj.name = module, name
            cls._cache[key] = obj
        return cls._cache[key]

    def __call__(self, *args):  # pickle's save_reduce insists that a reduce function be callable
        raise TypeError(f"{self.module}.{self.name} is a reference, not a function")


_NAMED_TYPES = frozenset({Global, DType, TorchConstant, TorchLayout})  # written by name: TreePickler only


class _TensorData:
    """The tensor inside a Parameter: pickled without taking the Parameter's memo slot."""

    def __init__(self, tensor: LazyTensor):
        self.tensor = tensor


class _TensorWriting:
    """What both picklers write for storages and tensors: the persistent id and the rebuild call torch writes.
    ``named(module, name)`` is how each pickler names a global (by reference, or as the real torch object)."""

    def __init__(
        self, file: IO[bytes], storage_key: Callable[[StorageRef], str], location: Callable[[StorageRef], str]
    ):
        super().__init__(file, protocol=PROTOCOL)  # the pickler's own (next in the method order)
        self.storage_key, self.location = storage_key, location

    def named(self, module: str, name: str) -> Any:
        raise NotImplementedError

    def persistent_id(self, obj: Any):
        if type(obj) is StorageRef:
            typed = obj.dtype in TYPED_STORAGE
            kind = (
                self.named("torch", TYPED_STORAGE[obj.dtype])
                if typed
                else self.named("torch.storage", "UntypedStorage")
            )
            return ("storage", kind, self.storage_key(obj), self.location(obj), obj.numel if typed else obj.nbytes)
        return None

    def tensor_reduce(self, obj: Any):
        """The reduce value of a tensor (or of a Parameter's inner tensor); None for anything else."""
        if type(obj) is LazyTensor:
            if obj.parameter:
                return (
                    self.named("torch._utils", "_rebuild_parameter"),
                    (_TensorData(obj), obj.requires_grad, collections.OrderedDict()),
                )
            return self._rebuild(obj)
        if type(obj) is _TensorData:
            return self._rebuild(obj.tensor)
        return None

    def _rebuild(self, t: LazyTensor):
        args = (
            t.storage,
            t.storage_offset,
            tuple(t.shape),
            tuple(t.stride),
            t.requires_grad and not t.parameter,
            collections.OrderedDict(),
        )
        if t.dtype in STORAGE_CLASS:
            return self.named("torch._utils", "_rebuild_tensor_v2"), args
        return self.named("torch._utils", "_rebuild_tensor_v3"), (*args, self.named("torch", str(t.dtype)))


class TreePickler(_TensorWriting, pickle._Pickler):  # the pure-Python pickler: it writes globals by name
    named = staticmethod(Global)

    def reducer_override(self, obj: Any):
        reduced = self.tensor_reduce(obj)
        if reduced is not None:
            return reduced
        if isinstance(obj, Placeholder):
            return _placeholder_reduce(obj)
        if isinstance(obj, RebuiltTensor):
            return _rebuilt_reduce(obj)
        if isinstance(obj, TorchLayout):
            return GET_LAYOUT, (str(obj),)
        return NotImplemented

    def save_global(self, obj, name=None):
        if isinstance(obj, type) and is_placeholder(obj):
            return self._write_global(obj, obj._reference)
        return super().save_global(obj, name)

    def _write_global(self, obj, ref: Reference):
        self.write(pickle.GLOBAL + ref.module.encode("utf-8") + b"\n" + ref.name.encode("utf-8") + b"\n")
        self.memoize(obj)

    dispatch = pickle._Pickler.dispatch.copy()
    dispatch[Global] = lambda self, obj: self._write_global(obj, Reference(obj.module, obj.name))
    dispatch[DType] = lambda self, obj: self._write_global(obj, Reference("torch", str(obj)))
    dispatch[TorchConstant] = lambda self, obj: self._write_global(obj, Reference("torch", str(obj)))


GET_LAYOUT = Global("torch.serialization", "_get_layout")


def _rebuilt_reduce(obj: RebuiltTensor):
    """The same call torch wrote; a quantized tensor's data goes back to (storage, offset, size, stride)."""
    function = Global("torch._utils", obj.function)
    if obj.kind == "quantized":
        data, params, requires_grad, hooks = obj.args
        return function, (
            data.storage,
            data.storage_offset,
            tuple(data.shape),
            tuple(data.stride),
            params,
            requires_grad,
            hooks if hooks is not None else collections.OrderedDict(),
        )
    return function, obj.args


def _placeholder_reduce(obj: Placeholder):
    cls = type(obj)
    state = obj._state
    items = iter(obj._items) if obj._items else None
    dict_items = iter(obj._dict_items.items()) if obj._dict_items else None
    how = obj.__dict__.get("_built_by", "newobj")
    if how == "reconstructor":
        return copyreg._reconstructor, (cls, object, None), state, items, dict_items
    if how == "call":
        return cls, tuple(obj._args), state, items, dict_items
    return copyreg.__newobj__, (cls, *obj._args), state, items, dict_items


class _NeedsNames(Exception):
    """The tree holds something only the name-writing pickler can write."""


class FastTreePickler(_TensorWriting, pickle.Pickler):
    """The C pickler, for trees of plain data and tensors (state dicts, fuse-train checkpoints): the same bytes
    as ``TreePickler`` (a test holds them equal), several times faster.  torch's own rebuild functions and
    storage classes are written as stand-ins that ``torch_names`` renames (torch is not imported); anything
    else that needs a name written without importing it raises ``_NeedsNames``."""

    def __init__(self, *args):
        super().__init__(*args)
        self.standins: dict[tuple[str, str], type] = {}  # the ones this pickle writes (twice per tensor: cached)

    def named(self, module: str, name: str) -> type:
        found = self.standins.get((module, name))
        if found is None:
            found = self.standins[module, name] = torch_names.standin(module, name)
        return found

    def reducer_override(self, obj: Any):
        reduced = self.tensor_reduce(obj)
        if reduced is not None:
            return reduced
        if type(obj) is collections.OrderedDict and not obj:
            # every tensor's empty hooks dict: what its own __reduce_ex__ writes (the class, no arguments, no
            # items), without copyreg's slot lookup per tensor
            return collections.OrderedDict, ()
        if (
            type(obj) in _NAMED_TYPES
            or isinstance(obj, (Placeholder, RebuiltTensor))
            or (isinstance(obj, type) and is_placeholder(obj))
        ):
            raise _NeedsNames(type(obj).__name__)
        return NotImplemented


def pickle_tree(tree: Any, location: Callable[[StorageRef], str] | None = None) -> tuple[bytes, list[StorageRef]]:
    """The ``data.pkl`` bytes for ``tree`` and its storages in key order ("0", "1", ...)."""
    keys: dict[int, str] = {}
    storages: list[StorageRef] = []

    def storage_key(ref: StorageRef) -> str:
        if id(ref) not in keys:
            keys[id(ref)] = str(len(storages))
            storages.append(ref)
        return keys[id(ref)]

    where = location or (lambda ref: ref.location)
    buf = io.BytesIO()
    try:
        fast = FastTreePickler(buf, storage_key, where)
        fast.dump(tree)
        data = torch_names.to_torch_names(buf.getvalue(), len(fast.standins))
        if data is not None:
            return data, storages
    except _NeedsNames:  # placeholders, rebuilt tensors, torch constants: the pickler that writes any name
        pass
    keys.clear()
    storages.clear()
    buf = io.BytesIO()
    TreePickler(buf, storage_key, where).dump(tree)
    return buf.getvalue(), storages
