"""HDF5 checkpoints through h5py: groups are dicts, datasets are tensors, attributes are plain values.

The layout ``ckpt convert`` writes (see docs/checkpoint-format.md, HDF5 section): a group per dict, a
``__kind__`` attribute of ``list`` / ``tuple`` on groups that were sequences (children named 0, 1, ...), plain
values as attributes, tensors as datasets with a ``dtype`` attribute where numpy has no equivalent (bfloat16
is stored as uint16 bits).  Any other HDF5 file is still described the same way.  Datasets written with
fletcher32 are checksummed by HDF5 on every read; a failure is reported for that dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ckpttools.report import ERROR, Finding
from ckpttools.unpickle import DTYPE_SIZES, DType, LazyTensor, StorageRef

KIND_ATTR, DTYPE_ATTR = "__kind__", "dtype"
NUMPY_TO_TORCH = {"float64": "float64", "float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32",
                  "int16": "int16", "int8": "int8", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32",
                  "uint64": "uint64", "bool": "bool", "complex64": "complex64", "complex128": "complex128"}


def plain(value: Any) -> Any:
    """An HDF5 attribute as a Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    return value


def open_hdf5(path: Path):
    import h5py

    from ckpttools.reader import HDF5, Checkpoint, NotACheckpoint

    ckpt = Checkpoint(path, HDF5)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise NotACheckpoint(f"HDF5 file that h5py cannot open ({exc})") from None
    datasets: dict[str, str] = {}

    def convert(group, prefix: str) -> Any:
        out: dict[str, Any] = {}
        for key, value in group.attrs.items():
            if key != KIND_ATTR:
                out[key] = plain(value)
        for key, item in group.items():
            name = f"{prefix}/{key}" if prefix else key
            if isinstance(item, h5py.Group):
                out[key] = convert(item, name)
            else:
                dtype = str(item.attrs.get(DTYPE_ATTR, NUMPY_TO_TORCH.get(item.dtype.name, "uint8")))
                if isinstance(dtype, bytes):
                    dtype = dtype.decode()
                if dtype not in DTYPE_SIZES:
                    ckpt.findings.append(Finding(ERROR, "hdf5.dtype", f"dataset {name} has dtype {dtype} that no tensor "
                                                 "has", name))
                    continue
                shape = tuple(item.shape)
                numel = int(np.prod(shape)) if shape else 1
                ref = StorageRef(name, DType(dtype), numel, "cpu", None)
                datasets[name] = name
                ckpt.storages[name] = ref
                strides, acc = [], 1
                for s in reversed(shape):
                    strides.append(acc)
                    acc *= s
                out[key] = LazyTensor(ref, 0, shape, tuple(reversed(strides)))
        kind = plain(group.attrs.get(KIND_ATTR, "dict"))
        if kind in ("list", "tuple"):
            items = [out[str(i)] for i in range(len(out)) if str(i) in out]
            return items if kind == "list" else tuple(items)
        return out

    ckpt.tree = convert(handle, "")
    ckpt.metadata = {k: plain(v) for k, v in handle.attrs.items() if k != KIND_ATTR}

    def read_all(ref: StorageRef) -> bytes:
        return np.ascontiguousarray(handle[ref.key][()]).tobytes()

    def iter_storage(ref: StorageRef, chunk: int):
        ds = handle[ref.key]
        if ds.shape == () or ds.size == 0:
            yield np.ascontiguousarray(ds[()]).tobytes()
            return
        rows = max(1, chunk // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]) if ds.ndim > 1 else 1)))
        for start in range(0, ds.shape[0], rows):  # HDF5 checks fletcher32 per chunk as it reads
            yield np.ascontiguousarray(ds[start: start + rows]).tobytes()

    for ref in ckpt.storages.values():
        ref.reader = read_all
    ckpt.iter_storage = iter_storage
    ckpt.references = []
    return ckpt
