"""A restricted unpickler that never imports or calls anything outside an allow-list.

``pickle`` runs code by design: GLOBAL / STACK_GLOBAL name a callable, REDUCE / NEWOBJ / BUILD call it.
Here every global goes through ``find_class``, which returns one of three things:

* an allowed global: our own inert implementation (tensor rebuilds build ``LazyTensor`` descriptions,
  ``OrderedDict``, ``torch.Size`` -> tuple, dtypes -> ``DType`` names, numpy array reconstruction);
* anything else: a *placeholder class* named after the reference.  Calling or instantiating it just records
  its arguments and state, so a pickled ``DetectionModel`` or ``argparse.Namespace`` becomes an inert
  ``Placeholder`` whose tensors can still be read.

Nothing from the checkpoint's modules is ever imported.  Every reference is recorded in ``references``;
``scan_globals`` also finds them statically (GLOBAL, STACK_GLOBAL, through memo indirection) so a pickle
that fails halfway still has all its references reported.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
from dataclasses import dataclass
from typing import Any, Callable

# module roots / (module, name) pairs whose use in a checkpoint is an attack, not a convenience
DANGEROUS_MODULES = {"os", "posix", "nt", "subprocess", "sys", "importlib", "runpy", "pickle", "_pickle", "socket",
                     "shutil", "pty", "ctypes", "code", "codeop", "marshal", "types", "webbrowser", "multiprocessing",
                     "signal", "asyncio", "commands", "popen2", "tempfile", "io", "_io",
                     "urllib", "http", "ftplib", "smtplib", "telnetlib", "requests", "dill", "cloudpickle",
                     "functools", "operator", "inspect", "threading", "_thread",
                     "pip", "setuptools", "distutils", "timeit", "pdb", "bdb", "trace", "profile", "cProfile",
                     "zipimport", "pkgutil", "imp", "site", "sysconfig", "torch.hub", "torch._C",
                     "torch.ops", "torch.jit", "torch.package", "torch.serialization", "numpy.testing",
                     "numpy.f2py", "numpy.distutils", "numpy.ctypeslib"}
DANGEROUS_BUILTINS = {"eval", "exec", "execfile", "compile", "getattr", "setattr", "delattr", "__import__", "open",
                      "globals", "locals", "vars", "input", "breakpoint", "memoryview", "help", "exit", "quit",
                      "reload", "file", "apply", "__build_class__", "type", "super"}


@dataclass(frozen=True)
class Reference:
    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def dangerous(self) -> bool:
        root = self.module.split(".")[0]
        if self.module in ("builtins", "__builtin__"):
            return self.name in DANGEROUS_BUILTINS
        return root in DANGEROUS_MODULES or self.module in DANGEROUS_MODULES or any(
            self.module.startswith(m + ".") for m in DANGEROUS_MODULES if "." in m)


class DType(str):
    """A torch dtype by name ('float32', 'bfloat16', ...), without importing torch."""

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self]


DTYPE_SIZES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
               "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1, "complex64": 8, "complex128": 16,
               "complex32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
               "qint8": 1, "quint8": 1, "qint32": 4}
# legacy typed storages (torch.FloatStorage, ...) -> dtype
STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                  "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
                  "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8", "TypedStorage": "uint8"}


@dataclass
class StorageRef:
    """One storage record of a checkpoint: where its bytes are and how to read them."""

    key: str
    dtype: DType
    numel: int
    location: str
    reader: Callable[["StorageRef"], bytes] | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES.get(self.dtype, 1)


@dataclass
class LazyTensor:
    """A tensor described by the pickle; its bytes are read from the storage only when asked."""

    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False
    parameter: bool = False

    @property
    def dtype(self) -> DType:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES.get(self.dtype, 1)

    def extent(self) -> int:
        """Elements of the storage this view needs (offset + furthest element + 1); 0 for an empty tensor."""
        if self.numel == 0:
            return 0
        return self.storage_offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride)) + 1

    def is_contiguous_view(self) -> bool:
        expected, acc = [], 1
        for s in reversed(self.shape):
            expected.append(acc)
            acc *= s
        return tuple(reversed(expected)) == tuple(self.stride) or self.numel <= 1

    def load(self):
        """The tensor as a real ``torch.Tensor`` (reads its storage record)."""
        import torch

        data = self.storage.reader(self.storage) if self.storage.reader else b""
        dtype = getattr(torch, self.storage.dtype)
        flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        if self.numel == 0:
            return torch.empty(self.shape, dtype=dtype)
        return flat.as_strided(self.shape, self.stride, self.storage_offset).clone()

    def __repr__(self) -> str:
        return f"LazyTensor({self.dtype}, {list(self.shape)}, storage={self.storage.key})"


def contiguous_strides(shape) -> tuple[int, ...]:
    """Row-major (C order) strides of ``shape``, in elements."""
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


class Placeholder:
    """An inert stand-in for an object of a class that was not imported.  Records constructor arguments,
    state, list items and dict items; never runs the real class's code."""

    _reference: Reference = Reference("?", "?")

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        obj.__dict__["_kwargs"] = kwargs
        obj.__dict__["_state"] = None
        obj.__dict__["_items"] = []
        obj.__dict__["_dict_items"] = {}
        return obj

    def __init__(self, *args, **kwargs):
        # reached only when pickle *called* the class (REDUCE), not for NEWOBJ's cls.__new__(cls, *args):
        # remembered so that writing the object back (ckpttools.torchsave) rebuilds it the same way
        self.__dict__["_built_by"] = "call"

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):
        self._dict_items[key] = value

    def append(self, value):
        self._items.append(value)

    def extend(self, values):
        self._items.extend(values)

    def __getattr__(self, name):
        # pickle may look up e.g. `__setstate__` or `extend`; anything else is absent, never computed
        raise AttributeError(name)

    def __reduce__(self):
        raise pickle.PicklingError("placeholders are descriptions and cannot be pickled again")

    @property
    def state(self):
        """The object's recorded state: BUILD state, else constructor arguments."""
        return self._state if self._state is not None else (self._args or None)

    def __repr__(self) -> str:
        return f"<{self._reference.qualname} (not imported)>"


def _placeholder_class(ref: Reference) -> type:
    return type(ref.name if ref.name.isidentifier() else "Placeholder", (Placeholder,),
                {"_reference": ref, "__module__": "ckpttools.placeholder"})


# classes that are only described (placeholders), never worth a warning: DCP's own metadata dataclasses
BENIGN_PREFIXES = ("torch.distributed.checkpoint.",)


def is_placeholder(obj: Any) -> bool:
    return isinstance(obj, Placeholder) or (isinstance(obj, type) and issubclass(obj, Placeholder))


# ---- allowed globals: our own inert implementations ---------------------------------------------------------

def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("tensor rebuild without a storage record")
    return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride), bool(requires_grad))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype=None, metadata=None):
    t = _rebuild_tensor(storage, storage_offset, size, stride, requires_grad)
    if dtype is not None and t.storage.dtype != dtype:
        # an UntypedStorage (dtypes without a legacy storage class, e.g. uint16): its numel counted bytes
        itemsize = DTYPE_SIZES.get(dtype, 1)
        t.storage.numel //= itemsize
        t.storage.dtype = DType(dtype)
    return t


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if isinstance(data, LazyTensor):
        data.requires_grad, data.parameter = bool(requires_grad), True
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _safe_reconstructor(cls, base, state):
    if is_placeholder(cls):
        obj = cls()
        obj.__dict__["_built_by"] = "reconstructor"
        return obj
    if cls is collections.OrderedDict or cls is dict:
        return cls()
    raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return obj.encode(encoding, errors)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return {}
    try:  # numpy's own pickle helpers (numpy 2 renamed numpy.core to numpy._core)
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    out = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = multiarray._reconstruct
        out[(mod, "scalar")] = multiarray.scalar
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    for name in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool_", "uint16",
                 "uint32", "uint64", "complex64", "complex128"):
        out[("numpy", name)] = getattr(np, name)
    for mod in ("numpy.dtypes", "numpy"):
        for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "Int16DType",
                     "Int8DType", "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "BoolDType"):
            if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
                out[(mod, name)] = getattr(np.dtypes, name)
    return out


def _torch_dtype_globals() -> dict[tuple[str, str], Any]:
    out = {("torch", name): DType(name) for name in DTYPE_SIZES}
    for name in ("float", "double", "half", "long", "int", "short", "cfloat", "cdouble"):
        alias = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
                 "short": "int16", "cfloat": "complex64", "cdouble": "complex128"}[name]
        out[("torch", name)] = DType(alias)
    for storage, dtype in STORAGE_DTYPES.items():
        out[("torch", storage)] = DType(dtype)
        out[("torch.storage", storage)] = DType(dtype)
    return out


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): lambda *a: tuple(*a),
    ("torch", "device"): lambda *a: ":".join(str(x) for x in a),
    ("torch", "strided"): "strided",
    ("torch.torch_version", "TorchVersion"): str,
    ("torch.serialization", "_get_layout"): lambda name: str(name),  # DCP metadata: a layout by name
    **{("pathlib", n): (lambda *parts: "/".join(str(p) for p in parts)) for n in
       ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")},
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{(mod, t.__name__): t for mod in ("builtins", "__builtin__")
       for t in (dict, list, tuple, int, float, str, bool, bytes)},
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "complex"): complex,
    ("builtins", "slice"): slice, ("builtins", "bytearray"): bytearray, ("builtins", "range"): range,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("copy_reg", "_reconstructor"): _safe_reconstructor,
    ("_codecs", "encode"): _safe_codecs_encode,
    **_torch_dtype_globals(),
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` never imports. ``persistent_load`` is supplied by the container."""

    def __init__(self, file, persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file, encoding="latin1")
        self._persistent = persistent_load
        self._references: dict[Reference, None] = {}
        self._placeholders: dict[Reference, type] = {}
        self._numpy = None

    def find_class(self, module: str, name: str):
        ref = Reference(module, name)
        self._references[ref] = None
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module.startswith("numpy"):
            if self._numpy is None:
                self._numpy = _numpy_globals()
            if (module, name) in self._numpy:
                return self._numpy[(module, name)]
        if ref not in self._placeholders:
            self._placeholders[ref] = _placeholder_class(ref)
        return self._placeholders[ref]

    @property
    def references(self) -> list[Reference]:
        return list(self._references)

    def persistent_load(self, pid):
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent id in a plain pickle")
        return self._persistent(pid)


def restricted_load(data: bytes | io.BufferedIOBase, persistent_load=None) -> tuple[Any, list[Reference]]:
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    unpickler = RestrictedUnpickler(stream, persistent_load)
    obj = unpickler.load()
    return obj, unpickler.references


def scan_globals(data: bytes) -> tuple[list[Reference], str | None]:
    """Every global a pickle names, found without executing it (GLOBAL / INST args, STACK_GLOBAL operands,
    including strings fetched from the memo).  Returns (references, error) where error describes a pickle
    that could not be parsed to the end."""
    refs: list[Reference] = []
    memo: dict[int, Any] = {}
    stack: list[Any] = []  # a shallow model of the stack: strings we can see, None for anything else
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = arg.partition(" ")
                refs.append(Reference(module, attr))
                stack.append(None)
            elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                          "BINSTRING", "STRING"):
                stack.append(arg if isinstance(arg, str) else str(arg))
            elif name == "STACK_GLOBAL":
                attr = stack.pop() if stack else None
                module = stack.pop() if stack else None
                refs.append(Reference(str(module) if module is not None else "?", str(attr) if attr is not None else "?"))
                stack.append(None)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = stack[-1] if stack else None
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo.get(int(arg)))
            elif name == "STOP":
                break
            elif name in ("POP",):
                if stack:
                    stack.pop()
            elif name in ("MARK", "FRAME", "PROTO"):
                continue
            else:
                stack.append(None)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle: report what was seen
        return refs, f"{exc.__class__.__name__}: {exc}"
    return refs, None
