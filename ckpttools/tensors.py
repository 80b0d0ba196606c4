"""The tensor data model, without torch: dtypes, storages, lazy tensors, and walking trees of them.

``DTYPES`` is the one dtype table of the package: every format and check derives what it needs from it
(item size, safetensors code, numpy type or the unsigned type of the same width used to carry the bits, the
legacy storage class, the exponent mask that marks NaN/Inf).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckpttools.objects import Placeholder


@dataclass(frozen=True)
class DTypeInfo:
    name: str  # torch's name (torch.float32 -> "float32"); also how DCP and our HDF5 attribute name it
    itemsize: int
    safetensors: str | None = None  # safetensors header code
    numpy: str | None = None  # numpy dtype holding the values natively; None: carried as bits (see ``bits``)
    storage_class: str | None = None  # legacy typed storage class (torch.FloatStorage, ...)
    # NaN/Inf by their bits: a float (each part of a complex) is NaN or Inf exactly when ``bits & exponent_mask``
    # equals ``nonfinite_bits`` (None: equals the mask, all exponent bits set, as in IEEE formats)
    exponent_mask: int | None = None
    nonfinite_bits: int | None = None

    @property
    def bits(self) -> str:
        """The unsigned numpy type of the same width (bit-exact carrier for dtypes numpy lacks)."""
        return {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64", 16: "complex128"}[self.itemsize]

    @property
    def floating(self) -> bool:
        return self.exponent_mask is not None


def _d(name, itemsize, st=None, npy=None, storage=None, mask=None, nonfinite=None) -> DTypeInfo:
    return DTypeInfo(name, itemsize, st, npy, storage, mask, nonfinite)


DTYPES: dict[str, DTypeInfo] = {
    d.name: d
    for d in (
        _d("float64", 8, "F64", "float64", "DoubleStorage", 0x7FF0000000000000),
        _d("float32", 4, "F32", "float32", "FloatStorage", 0x7F800000),
        _d("float16", 2, "F16", "float16", "HalfStorage", 0x7C00),
        _d("bfloat16", 2, "BF16", None, "BFloat16Storage", 0x7F80),
        _d("complex128", 16, None, "complex128", "ComplexDoubleStorage", 0x7FF0000000000000),
        _d("complex64", 8, "C64", "complex64", "ComplexFloatStorage", 0x7F800000),
        _d("complex32", 4, mask=0x7C00),  # two float16 parts
        _d("int64", 8, "I64", "int64", "LongStorage"),
        _d("int32", 4, "I32", "int32", "IntStorage"),
        _d("int16", 2, "I16", "int16", "ShortStorage"),
        _d("int8", 1, "I8", "int8", "CharStorage"),
        _d("uint8", 1, "U8", "uint8", "ByteStorage"),
        _d("uint16", 2, "U16", "uint16"),
        _d("uint32", 4, "U32", "uint32"),
        _d("uint64", 8, "U64", "uint64"),
        _d("bool", 1, "BOOL", "bool", "BoolStorage"),
        _d("float8_e4m3fn", 1, "F8_E4M3", mask=0x7F),  # no infinities; NaN is S.1111.111
        _d("float8_e5m2", 1, "F8_E5M2", mask=0x7C),
        _d("float8_e4m3fnuz", 1, "F8_E4M3FNUZ", mask=0xFF, nonfinite=0x80),  # fnuz: the one NaN is -0's bits
        _d("float8_e5m2fnuz", 1, "F8_E5M2FNUZ", mask=0xFF, nonfinite=0x80),
        _d("float8_e8m0fnu", 1, "F8_E8M0", mask=0xFF),  # NaN: 0xFF; numpy has neither fp8: bits in HDF5
        _d("float4_e2m1fn_x2", 1, "F4"),  # safetensors' F4 counts 4-bit elements: its last dim is twice torch's
        # torch's opaque bit containers: bytes without a numeric meaning
        _d("bits8", 1),
        _d("bits16", 2),
        _d("bits1x8", 1),
        _d("bits2x4", 1),
        _d("bits4x2", 1),
        _d("qint8", 1, storage="QInt8Storage"),
        _d("quint8", 1, storage="QUInt8Storage"),
        _d("qint32", 4, storage="QInt32Storage"),
        _d("quint4x2", 1, storage="QUInt4x2Storage"),
        _d("quint2x4", 1, storage="QUInt2x4Storage"),
    )
}
TORCH_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
}
FROM_SAFETENSORS = {d.safetensors: d.name for d in DTYPES.values() if d.safetensors}
FROM_STORAGE_CLASS = {d.storage_class: d.name for d in DTYPES.values() if d.storage_class}
FROM_NUMPY = {d.numpy: d.name for d in DTYPES.values() if d.numpy}


class DType(str):
    """A torch dtype by name ('float32', 'bfloat16', ...), without importing torch."""

    @property
    def info(self) -> DTypeInfo:
        return DTYPES.get(self) or DTypeInfo(str(self), 1)

    @property
    def itemsize(self) -> int:
        return _itemsize(self)


@dataclass(slots=True)  # slots: a checkpoint may hold hundreds of thousands (less memory, faster attributes)
class StorageRef:
    """One storage of a checkpoint: its key in the container, dtype, size, and the device it was saved on."""

    key: str
    dtype: DType
    numel: int
    location: str
    reader: Callable[[StorageRef], bytes] | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name (1 for one this table lacks, as ``DType.info``): without making a DType,
    which the per-tensor paths call hundreds of thousands of times."""
    info = DTYPES.get(dtype)
    return info.itemsize if info is not None else 1


def contiguous_strides(shape) -> tuple[int, ...]:
    """Row-major (C order) strides of ``shape``, in elements."""
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


@dataclass(slots=True)
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
        return d if type(d := self.storage.dtype) is DType else DType(d)  # no new string per call: a hot path

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.storage.dtype)

    def extent(self) -> int:
        """Elements of the storage this view needs (offset + furthest element + 1); 0 for an empty tensor."""
        if self.numel == 0:
            return 0
        return self.storage_offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride)) + 1

    def is_contiguous_view(self) -> bool:
        return contiguous_strides(self.shape) == tuple(self.stride) or self.numel <= 1

    def load(self):
        """The tensor as a real ``torch.Tensor`` (reads its storage)."""
        import torch

        data = self.storage.reader(self.storage) if self.storage.reader else b""
        dtype = getattr(torch, self.storage.dtype)
        flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        if self.numel == 0:
            return torch.empty(self.shape, dtype=dtype)
        return flat.as_strided(self.shape, self.stride, self.storage_offset).clone()

    def __repr__(self) -> str:
        return f"LazyTensor({self.dtype}, {list(self.shape)}, storage={self.storage.key})"


class TorchConstant(str):
    """A torch module constant a pickle names (``torch.per_tensor_affine``, ``torch.strided``): compares as its
    name; written back as the same global."""


class TorchLayout(str):
    """A layout as torch pickles it, through ``torch.serialization._get_layout("torch.sparse_coo")``: compares as
    that string; written back as the same call."""


REBUILT_KINDS = {
    "_rebuild_qtensor": "quantized",
    "_rebuild_sparse_tensor": "sparse",
    "_rebuild_nested_tensor": "nested",
    "_rebuild_meta_tensor_no_storage": "meta",
}


def sparse_values_at(layout: str) -> int:
    """Where a sparse tensor's values are in what torch pickles: (indices, values, size[, coalesced]) for COO,
    (compressed indices, plain indices, values, size) for CSR / CSC / BSR / BSC."""
    return 1 if str(layout).endswith("coo") else 2


@dataclass(eq=False)
class RebuiltTensor:
    """A tensor torch rebuilds with one of its other weights-only functions (``REBUILT_KINDS``): quantized,
    sparse, nested or meta.  Kept as the function's name and its arguments, read inertly; the tensors among
    the arguments are LazyTensors walked and checked like any other (a quantized tensor's integer data is one,
    in place of the bare storage torch passes), and the torch writer emits the same call again."""

    function: str
    args: tuple

    @property
    def kind(self) -> str:
        return REBUILT_KINDS[self.function]

    def _values(self) -> LazyTensor:
        """The part that holds the values: the quantized integers, the sparse values, the nested buffer."""
        if self.kind == "sparse":
            return self.args[1][sparse_values_at(self.args[0])]
        return self.args[0]

    @property
    def dtype(self) -> DType:
        return DType(self.args[0]) if self.kind == "meta" else self._values().dtype

    @property
    def shape(self) -> tuple | None:
        if self.kind == "quantized":
            return tuple(self.args[0].shape)
        if self.kind == "sparse":  # the dense size follows the values
            return tuple(self.args[1][sparse_values_at(self.args[0]) + 1])
        if self.kind == "meta":
            return tuple(self.args[1])
        return None  # nested: one shape per component

    @property
    def numel(self) -> int:
        """Values it holds: the quantized data's, the sparse values', the nested buffer's; a meta shape's."""
        if self.kind != "meta":
            return self._values().numel
        n = 1
        for d in self.args[1]:
            n *= d
        return n

    def describe(self) -> str:
        """e.g. ``quantized qint8 [4] torch.per_tensor_affine scale=0.1 zero_point=3``"""
        shape = f" {list(self.shape)}" if self.shape is not None else ""
        if self.kind == "quantized":
            params = self.args[1]
            scheme = str(params[0])
            extra = f" scale={params[1]} zero_point={params[2]}" if len(params) == 3 else ""
            return f"quantized {self.dtype}{shape} {scheme}{extra}"
        if self.kind == "sparse":
            return f"sparse {str(self.args[0]).removeprefix('torch.')} {self.dtype}{shape}"
        if self.kind == "nested":
            return f"nested {self.dtype} ({self.args[1].shape[0] if self.args[1].shape else '?'} components)"
        return f"meta {self.dtype}{shape} (no data)"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


TENSOR_TYPES = (LazyTensor, RebuiltTensor)  # what a state dict's values are


def tensor_bytes(t: LazyTensor, blocks: Iterable[bytes]) -> Iterator[bytes]:
    """The tensor's elements in C order, cut from ``blocks`` (its storage's bytes, in order).

    Contiguous views are sliced as they stream; a strided view (rare in checkpoints) is materialised.  A view
    that reaches past its storage (a damaged or hostile shape) raises OSError rather than allocate for it."""
    itemsize = t.dtype.itemsize
    if t.numel == 0:
        return
    if t.extent() > t.storage.numel or any(d < 0 for d in t.shape) or any(st < 0 for st in t.stride):
        raise OSError(f"tensor view {list(t.shape)} / {list(t.stride)} reaches past its storage of {t.storage.numel}")
    if t.is_contiguous_view():
        start, end = t.storage_offset * itemsize, (t.storage_offset + t.numel) * itemsize
        pos = 0
        for block in blocks:
            lo, hi = max(start, pos), min(end, pos + len(block))
            if lo < hi:
                yield block[lo - pos : hi - pos] if (lo - pos, hi - pos) != (0, len(block)) else block
            pos += len(block)
        return
    arr = np.frombuffer(b"".join(blocks), dtype=t.dtype.info.bits)
    view = np.lib.stride_tricks.as_strided(
        arr[t.storage_offset :], shape=t.shape, strides=[s * itemsize for s in t.stride]
    )
    yield np.ascontiguousarray(view).tobytes()


class TensorSource:
    """Bytes of storages and tensors: read from a checkpoint, or computed (a cast, a filled-in tensor)."""

    def __init__(self, ckpt=None):
        self.ckpt = ckpt  # anything with storage_chunks(ref): a formats.base.Checkpoint
        self.computed: dict[int, Callable[[], bytes]] = {}

    def storage_chunks(self, ref: StorageRef) -> Iterable[bytes]:
        if id(ref) in self.computed:
            return [self.computed[id(ref)]()]
        return self.ckpt.storage_chunks(ref)

    def tensor_chunks(self, t: LazyTensor) -> Iterator[bytes]:
        return tensor_bytes(t, self.storage_chunks(t.storage))

    def computed_tensor(
        self, dtype: str, shape: tuple[int, ...], make: Callable[[], bytes], location: str = "cpu"
    ) -> LazyTensor:
        """A new contiguous tensor whose bytes ``make()`` produces when it is written."""
        numel = 1
        for s in shape:
            numel *= s
        ref = StorageRef(f"computed-{len(self.computed)}", DType(dtype), numel, location)
        self.computed[id(ref)] = make
        return LazyTensor(ref, 0, tuple(shape), contiguous_strides(shape))


def module_tensors(obj: Any, prefix: str = "") -> dict[str, LazyTensor]:
    """The state_dict-style names of a pickled nn.Module placeholder: ``_parameters``, ``_buffers`` and
    ``_modules`` walked as torch would, without importing any of it."""
    out: dict[str, LazyTensor] = {}
    state = obj._state if isinstance(obj, Placeholder) else None
    if not isinstance(state, dict):
        return out
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if isinstance(t, TENSOR_TYPES):
                out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        out.update(module_tensors(child, f"{prefix}{name}."))
    return out
