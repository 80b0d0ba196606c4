"""A restricted unpickler that never imports or calls anything the checkpoint names.

``pickle`` runs code by design: GLOBAL / STACK_GLOBAL name a callable, REDUCE / NEWOBJ / BUILD call it.
Here every global goes through ``find_class``, which returns one of two things:

* a global on the policy's allow-list that has an implementation below: our own inert version (tensor
  rebuilds build ``LazyTensor`` descriptions, ``OrderedDict``, ``torch.Size`` -> tuple, dtypes -> ``DType``
  names, numpy array reconstruction);
* anything else: a *placeholder class* named after the reference.  Calling or instantiating it only records
  its arguments and state, so a pickled ``DetectionModel`` or ``argparse.Namespace`` becomes an inert
  ``Placeholder`` whose tensors can still be read.

Whether a file is *safe* is decided by ``policy.judge`` on the static scan, never here: this module only
guarantees that reading it here runs nothing of it.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Callable
from typing import Any

from ckpttools.objects import Reference, is_placeholder, placeholder_class
from ckpttools.pickle.allowlist import ALLOWED, QSCHEMES, SPARSE_LAYOUTS
from ckpttools.pickle.scan_model import normalise
from ckpttools.tensors import (
    DTYPES,
    FROM_STORAGE_CLASS,
    TORCH_ALIASES,
    DType,
    LazyTensor,
    RebuiltTensor,
    StorageRef,
    TorchConstant,
    TorchLayout,
    sparse_values_at,
)


class UnknownDType(pickle.UnpicklingError):
    """A tensor of a dtype newer than our table: not damage, a limit of this version."""


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("tensor rebuild without a storage record")
    return LazyTensor(storage, int(storage_offset), _shared(tuple(size)), _shared(tuple(stride)), bool(requires_grad))


# Equal shapes and strides share one tuple: an optimizer's checkpoint repeats a few shapes over 200,000 tensors
# (two tuples of 56+ bytes each per tensor otherwise).  Bounded: cleared when it grows past what models repeat.
_SHAPES: dict[tuple, tuple] = {}


def _shared(value: tuple) -> tuple:
    if len(_SHAPES) > 4096:
        _SHAPES.clear()
    return _SHAPES.setdefault(value, value)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype=None, metadata=None):
    t = _rebuild_tensor(storage, storage_offset, size, stride, requires_grad)
    if dtype is not None and not isinstance(dtype, DType):  # a torch dtype newer than our table: never guessed
        name = dtype._reference.qualname if is_placeholder(dtype) else repr(dtype)[:40]
        raise UnknownDType(f"a tensor of dtype {name}, which this version of ckpttools does not know")
    if dtype is not None and t.storage.dtype != dtype:
        # an UntypedStorage (dtypes without a legacy storage class, e.g. uint16): its numel counted bytes
        t.storage.numel //= DType(dtype).itemsize
        t.storage.dtype = DType(dtype)
    return t


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if isinstance(data, LazyTensor):
        data.requires_grad, data.parameter = bool(requires_grad), True
    return data


def _rebuild_qtensor(storage, storage_offset, size, stride, quantizer_params, requires_grad, backward_hooks):
    # the integer data as a LazyTensor (checked and streamed like any other); the writer unpacks it again
    data = _rebuild_tensor(storage, storage_offset, size, stride, requires_grad)
    if not (isinstance(quantizer_params, tuple) and quantizer_params and quantizer_params[0] in QSCHEMES):
        raise pickle.UnpicklingError(f"quantized tensor with quantizer parameters {str(quantizer_params)[:60]}")
    return RebuiltTensor("_rebuild_qtensor", (data, quantizer_params, bool(requires_grad), backward_hooks))


def _rebuild_sparse_tensor(layout, data):
    parts = {"torch.sparse_coo": (3, 4)}.get(str(layout), (4,))
    tensors = data[: sparse_values_at(layout) + 1] if isinstance(data, tuple) else ()  # indices and values
    if (
        str(layout) not in SPARSE_LAYOUTS
        or not isinstance(data, tuple)
        or len(data) not in parts
        or not all(isinstance(t, LazyTensor) for t in tensors)
    ):
        raise pickle.UnpicklingError(f"sparse tensor of layout {str(layout)[:40]} with unexpected parts")
    return RebuiltTensor("_rebuild_sparse_tensor", (layout, data))


def _rebuild_nested_tensor(buffer, sizes, strides, storage_offsets):
    if not all(isinstance(t, LazyTensor) for t in (buffer, sizes, strides, storage_offsets)):
        raise pickle.UnpicklingError("nested tensor whose parts are not tensors")
    return RebuiltTensor("_rebuild_nested_tensor", (buffer, sizes, strides, storage_offsets))


def _rebuild_meta_tensor_no_storage(dtype, size, stride, requires_grad):
    if not isinstance(dtype, DType):
        raise pickle.UnpicklingError(f"meta tensor of dtype {str(dtype)[:40]}")
    return RebuiltTensor("_rebuild_meta_tensor_no_storage", (dtype, tuple(size), tuple(stride), bool(requires_grad)))


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)  # func is itself from find_class: an inert implementation or a placeholder


def _safe_reconstructor(cls, base, state):
    if is_placeholder(cls):
        obj = cls()
        obj.__dict__["_built_by"] = "reconstructor"
        return obj
    if cls is collections.OrderedDict or cls is dict:
        return cls()
    raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")


def _safe_newobj(cls, *args):
    if is_placeholder(cls) or cls in (dict, list, collections.OrderedDict):
        return cls.__new__(cls, *args)
    raise pickle.UnpicklingError(f"copyreg.__newobj__ of {cls!r} is not allowed")


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    if str(encoding).lower() not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return obj.encode(encoding, errors)


def _numpy_implementations() -> dict[tuple[str, str], Any]:
    import numpy as np

    try:  # numpy's own pickle helpers (numpy 2 renamed numpy.core to numpy._core)
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    out: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = multiarray._reconstruct
        out[(mod, "scalar")] = multiarray.scalar

    def _frombuffer(buf, dtype, shape, order):  # numpy's own helper, restated: data from bytes, nothing else
        return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape, order=order)

    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        out[(mod, "_frombuffer")] = _frombuffer
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    for mod, name in ALLOWED:
        if mod == "numpy" and hasattr(np, name) and (mod, name) not in out:
            out[(mod, name)] = getattr(np, name)
        elif mod == "numpy.dtypes" and hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            out[(mod, name)] = getattr(np.dtypes, name)
    return out


def _implementations() -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
        ("torch._utils", "_rebuild_sparse_tensor"): _rebuild_sparse_tensor,
        ("torch._utils", "_rebuild_nested_tensor"): _rebuild_nested_tensor,
        ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_meta_tensor_no_storage,
        ("torch", "Size"): lambda *a: tuple(*a),
        ("torch", "device"): lambda *a: ":".join(str(x) for x in a),
        ("torch.torch_version", "TorchVersion"): str,
        ("torch.serialization", "_get_layout"): lambda name: TorchLayout(name),
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "object"): object,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "range"): range,
        ("copyreg", "_reconstructor"): _safe_reconstructor,
        ("copyreg", "__newobj__"): _safe_newobj,
        ("_codecs", "encode"): _safe_codecs_encode,
    }
    for name in (
        "build_intlist",
        "build_tensorlist",
        "build_doublelist",
        "build_boollist",
        "build_tensor_from_id",
        "restore_type_tag",
    ):
        out[("torch.jit._pickle", name)] = lambda value, *_: value
    for t in (dict, list, tuple, int, float, str, bool, bytes):
        out[("builtins", t.__name__)] = t
    for name in ("strided", "contiguous_format", "channels_last", "preserve_format", *QSCHEMES, *SPARSE_LAYOUTS):
        out[("torch", name.removeprefix("torch."))] = TorchConstant(name.removeprefix("torch."))
    for (mod, name), _reason in ALLOWED.items():
        if mod == "pathlib":
            out[(mod, name)] = lambda *parts: "/".join(str(p) for p in parts)
    for name in DTYPES:
        out[("torch", name)] = DType(name)
    for alias, name in TORCH_ALIASES.items():
        out[("torch", alias)] = DType(name)
    for storage, name in FROM_STORAGE_CLASS.items():
        out[("torch", storage)] = DType(name)
    for mod in ("torch", "torch.storage"):
        out[(mod, "UntypedStorage")] = out[(mod, "TypedStorage")] = DType("uint8")
    return out


IMPLEMENTATIONS = _implementations()


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` never imports. ``persistent_load`` is supplied by the container."""

    def __init__(self, file, persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file, encoding="latin1")
        self._persistent = persistent_load
        self._placeholders: dict[Reference, type] = {}
        self._numpy: dict | None = None

    def find_class(self, module: str, name: str):
        ref = normalise(module, name)
        key = (ref.module, ref.name)
        if key in IMPLEMENTATIONS:
            return IMPLEMENTATIONS[key]
        if key in ALLOWED and ref.module.startswith("numpy"):
            if self._numpy is None:
                self._numpy = _numpy_implementations()
            if key in self._numpy:
                return self._numpy[key]
        if ref not in self._placeholders:
            self._placeholders[ref] = placeholder_class(ref)
        return self._placeholders[ref]

    def persistent_load(self, pid):
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent id in a plain pickle")
        return self._persistent(pid)


def restricted_load(data: bytes | io.BufferedIOBase, persistent_load=None) -> Any:
    """Unpickle ``data`` (bytes or a stream positioned at a pickle) into inert descriptions."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    return RestrictedUnpickler(stream, persistent_load).load()
