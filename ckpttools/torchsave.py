"""Write a ``torch.save`` zip from a reader tree, one storage at a time, without torch and without running
anything from the source.

``torch.save`` needs every tensor in memory; convert, remap and repair only need to copy storages from one
container to another, so this writes the same archive ``torch.save`` would (``data.pkl``, ``data/<key>``
records aligned to 64 bytes, ``version``, ``byteorder``) with each storage streamed from its source.
The pickle is produced by Python's own pickler, taught three things:

* ``LazyTensor`` -> ``torch._utils._rebuild_tensor_v2`` (``_rebuild_parameter`` around it for parameters),
  the storage as a persistent id, exactly as torch writes them, so ``torch.load(weights_only=True)`` reads it;
* ``DType`` -> the ``torch.<dtype>`` global;
* placeholders (classes that were never imported) -> the same global reference and the same construction
  (NEWOBJ / REDUCE / ``copyreg._reconstructor``, BUILD state, list and dict items) they were read from.
  Nothing is imported to do that: the reference is written by name.
"""

from __future__ import annotations

import collections
import copyreg
import hashlib
import io
import pickle
import zipfile
from typing import IO, Any, Callable, Iterable

from ckpttools.unpickle import STORAGE_DTYPES, DType, LazyTensor, Placeholder, Reference, StorageRef, is_placeholder

ALIGNMENT = 64  # torch aligns storage records so mmap=True loads can use them in place
PROTOCOL = 2  # torch.save's default
STORAGE_CLASS = {dtype: name for name, dtype in STORAGE_DTYPES.items() if name not in ("UntypedStorage", "TypedStorage")}


class Global:
    """A module-level name written into the pickle by reference, never imported here."""

    _cache: dict[tuple[str, str], "Global"] = {}

    def __new__(cls, module: str, name: str):
        key = (module, name)
        if key not in cls._cache:
            obj = super().__new__(cls)
            obj.module, obj.name = module, name
            cls._cache[key] = obj
        return cls._cache[key]

    def __call__(self, *args):  # pickle's save_reduce insists that a reduce function be callable
        raise TypeError(f"{self.module}.{self.name} is a reference, not a function")


REBUILD_TENSOR = Global("torch._utils", "_rebuild_tensor_v2")
REBUILD_TENSOR_V3 = Global("torch._utils", "_rebuild_tensor_v3")
REBUILD_PARAMETER = Global("torch._utils", "_rebuild_parameter")


class _TensorData:
    """The tensor inside a Parameter: pickled without taking the Parameter's memo slot."""

    def __init__(self, tensor: LazyTensor):
        self.tensor = tensor


class TreePickler(pickle._Pickler):  # the pure-Python pickler: it lets us write globals by name
    def __init__(self, file: IO[bytes], storage_key: Callable[[StorageRef], str],
                 location: Callable[[StorageRef], str]):
        super().__init__(file, protocol=PROTOCOL)
        self.storage_key, self.location = storage_key, location

    def persistent_id(self, obj: Any):
        if isinstance(obj, StorageRef):
            typed = obj.dtype in STORAGE_CLASS
            kind = Global("torch", STORAGE_CLASS[obj.dtype]) if typed else Global("torch.storage", "UntypedStorage")
            numel = obj.numel if typed else obj.nbytes
            return ("storage", kind, self.storage_key(obj), self.location(obj), numel)
        return None

    def reducer_override(self, obj: Any):
        if isinstance(obj, LazyTensor):
            if obj.parameter:
                return REBUILD_PARAMETER, (_TensorData(obj), obj.requires_grad, collections.OrderedDict())
            return self._rebuild(obj)
        if isinstance(obj, _TensorData):
            return self._rebuild(obj.tensor)
        if isinstance(obj, Placeholder):
            return _placeholder_reduce(obj)
        return NotImplemented

    @staticmethod
    def _rebuild(t: LazyTensor):
        args = (t.storage, t.storage_offset, tuple(t.shape), tuple(t.stride), t.requires_grad and not t.parameter,
                collections.OrderedDict())
        if t.dtype in STORAGE_CLASS:
            return REBUILD_TENSOR, args
        return REBUILD_TENSOR_V3, (*args, Global("torch", str(t.dtype)))

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


def pickle_tree(tree: Any, location: Callable[[StorageRef], str] | None = None) -> tuple[bytes, list[StorageRef]]:
    """The ``data.pkl`` bytes for ``tree`` and its storages in key order ("0", "1", ...)."""
    keys: dict[int, str] = {}
    storages: list[StorageRef] = []

    def storage_key(ref: StorageRef) -> str:
        if id(ref) not in keys:
            keys[id(ref)] = str(len(storages))
            storages.append(ref)
        return keys[id(ref)]

    buf = io.BytesIO()
    TreePickler(buf, storage_key, location or (lambda ref: ref.location)).dump(tree)
    return buf.getvalue(), storages


def write_torch_zip(tree: Any, out: IO[bytes], chunks_of: Callable[[StorageRef], Iterable[bytes]],
                    location: Callable[[StorageRef], str] | None = None, archive: str = "archive",
                    on_bytes: Callable[[int], None] | None = None) -> list[StorageRef]:
    """Write ``tree`` to ``out`` (seekable) as torch.save does; each storage's bytes come from ``chunks_of``
    and must add up to its size.  Returns the storages written, in record order."""
    data_pkl, storages = pickle_tree(tree, location)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write(zf, f"{archive}/data.pkl", [data_pkl], len(data_pkl))
        for name, text in ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little")):
            _write(zf, f"{archive}/{name}", [text], len(text))
        for key, ref in enumerate(storages):
            written = _write(zf, f"{archive}/data/{key}", chunks_of(ref), ref.nbytes, on_bytes)
            if written != ref.nbytes:
                raise OSError(f"storage {ref.key}: {written} bytes read, {ref.nbytes} expected")
        _write(zf, f"{archive}/version", [b"3\n"], 2)
        serial = hashlib.sha1(data_pkl).hexdigest()[:20].encode()  # deterministic: same content, same bytes
        _write(zf, f"{archive}/.data/serialization_id", [serial], len(serial))
    return storages


def _write(zf: zipfile.ZipFile, name: str, chunks: Iterable[bytes], size: int,
           on_bytes: Callable[[int], None] | None = None) -> int:
    zinfo = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zinfo.compress_type = zipfile.ZIP_STORED
    zinfo.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule; it then appends a 20-byte zip64 field
    header = 30 + len(name.encode("utf-8")) + (20 if zip64 else 0) + 4  # + our padding field's own header
    pad = (-(zf.fp.tell() + header)) % ALIGNMENT
    zinfo.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad  # torch's padding field id ("FB")
    written = 0
    with zf.open(zinfo, "w", force_zip64=zip64) as w:
        for block in chunks:
            w.write(block)
            written += len(block)
            if on_bytes:
                on_bytes(len(block))
    return written
