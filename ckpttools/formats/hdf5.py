"""HDF5 checkpoints through h5py: groups are dicts, datasets are tensors, attributes are plain values.

The layout ``ckpt convert`` writes and reads back losslessly (docs/checkpoint-format.md, HDF5 section):

* a dict is a group; a list or tuple that holds tensors is a group with ``__kind__`` = ``list`` / ``tuple``
  and children named ``0``, ``1``, ...;
* a tensor is a dataset (chunked, fletcher32-checksummed, optionally gzip-compressed) with a ``dtype``
  attribute naming the torch dtype; bfloat16 is stored as its uint16 bits, float8 as uint8;
* a numpy array is a dataset with ``__kind__`` = ``ndarray``;
* a plain value is an attribute: str / int / float / bool natively, anything else (None, tuples, lists of
  plain values, very large ints) as tagged JSON named in the group's ``__json__`` attribute;
* dict keys that are not plain names (ints such as optimizer state indices, names with ``/``) are stored
  as ``~N`` with the original key in ``__keys__``; ``__order__`` keeps the key order when attributes and
  children interleave.

Any other HDF5 file is still described the same way.  Datasets written with fletcher32 are checksummed by
HDF5 on every read; a failure is reported for that dataset.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckpttools.atomic import atomic_path
from ckpttools.errors import NotACheckpoint
from ckpttools.formats.base import Checkpoint, WriteRequest, refuse_unwritable, to_plain_tree
from ckpttools.formats.hdf5_values import is_plain, plain, shared_objects, tag, untag
from ckpttools.formats.watched_child import run_watched
from ckpttools.report import ERROR, Finding
from ckpttools.tensors import DTYPES, FROM_NUMPY, DType, LazyTensor, StorageRef, contiguous_strides

NAME = "hdf5"
MAGIC = b"\x89HDF\r\n\x1a\n"

KIND_ATTR, DTYPE_ATTR, JSON_ATTR, KEYS_ATTR, ORDER_ATTR = "__kind__", "dtype", "__json__", "__keys__", "__order__"
RESERVED = {KIND_ATTR, JSON_ATTR, KEYS_ATTR, ORDER_ATTR}
LIBVER = ("v108", "latest")  # 1.8+ file format: dense attribute storage, so long JSON attributes fit


# ---- reading
# ----------------------------------------------------------------------------------------------------------


def detect(path: Path, head: bytes) -> bool:
    return head[:8] == MAGIC


def read(path: Path) -> Checkpoint:
    """The file's tree read in a child (``read_metadata_here`` there, watched: ``watched_child``), its tensors
    read here, one dataset at a time.  A child that loops or crashes makes an ``hdf5.unreadable`` finding."""
    import h5py  # imported when an HDF5 file is met: it costs start-up time otherwise

    ckpt = Checkpoint(path, NAME)
    payload, problem = run_watched("ckpttools.formats.hdf5_metadata", str(path))
    if problem:
        ckpt.findings.append(Finding(ERROR, "hdf5.unreadable", f"{path}: the HDF5 library: {problem}", str(path)))
        return ckpt
    # the child's own pickle of its own objects; a child that failed otherwise: read here, as it always was
    answer: Metadata = pickle.loads(payload) if payload is not None else read_metadata_here(path)
    if answer.not_a_checkpoint:
        raise NotACheckpoint(answer.not_a_checkpoint)
    ckpt.tree, ckpt.metadata, ckpt.storages = answer.tree, answer.metadata, answer.storages
    ckpt.findings.extend(answer.findings)
    if answer.tree is None:
        return ckpt
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise NotACheckpoint(_cannot_open(path, exc)) from None

    def read_all(ref: StorageRef) -> bytes:
        with _as_os_error(ref):
            return np.ascontiguousarray(handle[ref.key][()]).tobytes()

    def iter_storage(ref: StorageRef, chunk: int):
        with _as_os_error(ref):
            ds = handle[ref.key]
            if ds.shape == () or ds.size == 0:
                yield np.ascontiguousarray(ds[()]).tobytes()
                return
            rows = max(1, chunk // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]) if ds.ndim > 1 else 1)))
            for start in range(0, ds.shape[0], rows):  # HDF5 checks fletcher32 per chunk as it reads
                yield np.ascontiguousarray(ds[start : start + rows]).tobytes()

    for ref in ckpt.storages.values():
        ref.reader = read_all
    ckpt.iter_storage = iter_storage
    return ckpt


@dataclass
class Metadata:
    """What the child read: the tree (plain values and LazyTensors), the storages behind them, the file's own
    attributes, findings; or why there is no tree (not an HDF5 checkpoint, damaged metadata)."""

    tree: Any = None
    storages: dict[str, StorageRef] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    not_a_checkpoint: str = ""


def read_metadata_here(path: str | Path, progress: Callable[[], None] | None = None) -> Metadata:
    """Groups, attributes and dataset descriptions, read in this process (the child's work); ``progress`` is
    called for every object read."""
    import h5py

    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        return Metadata(not_a_checkpoint=_cannot_open(path, exc))
    with handle:
        ckpt = Checkpoint(path, NAME)
        try:
            tree = _TreeReader(ckpt, h5py.Group, progress).group_value(handle, "")
            metadata = {k: plain(v) for k, v in handle.attrs.items() if k not in RESERVED}
        except H5PY_ERRORS as exc:  # damaged metadata (a checksum, a link, an object header): said, not raised
            message = f"{path}: {_h5py_message(exc)}"
            return Metadata(findings=[Finding(ERROR, "hdf5.unreadable", message, str(path))])
    return Metadata(tree, ckpt.storages, metadata, ckpt.findings)


# what h5py raises on damaged bytes: a failed metadata checksum is KeyError on open, RuntimeError while
# iterating links, OSError or ValueError on reads
H5PY_ERRORS = (OSError, KeyError, RuntimeError, ValueError)


def _cannot_open(path: Path, exc: OSError) -> str:
    return f"{path}: HDF5 file that h5py cannot open ({exc})"


def _h5py_text(exc: BaseException) -> str:
    """h5py's message without the quotes a KeyError adds."""
    return str(exc).strip("'\"") or exc.__class__.__name__


def _h5py_message(exc: BaseException) -> str:
    return f"the HDF5 library could not read the file's metadata ({_h5py_text(exc)})"


@contextlib.contextmanager
def _as_os_error(ref: StorageRef):
    """A tensor's bytes that HDF5 cannot read are an unreadable storage (OSError), as in every other format."""
    try:
        yield
    except OSError:
        raise
    except (KeyError, RuntimeError, ValueError) as exc:
        raise OSError(f"dataset {ref.key}: {_h5py_text(exc)}") from None


_IN_PROGRESS = object()


class _TreeReader:
    """The file's groups and datasets as a tree of plain values and lazy tensors.

    A group or dataset hard-linked under several names (written so for a shared object) is read once and the
    same value returned for every name: the tree is a DAG again, and reading stays linear in the objects."""

    def __init__(self, ckpt: Checkpoint, group_type: type, progress: Callable[[], None] | None = None):
        self.ckpt, self.group_type, self.progress = ckpt, group_type, progress
        self.done: dict[Any, Any] = {}

    def dataset(self, item, name: str) -> Any:
        kind = plain(item.attrs.get(KIND_ATTR, ""))
        if kind == "ndarray":
            return np.asarray(item[()])
        dtype = str(plain(item.attrs.get(DTYPE_ATTR, FROM_NUMPY.get(item.dtype.name, "uint8"))))
        if dtype not in DTYPES:
            self.ckpt.findings.append(
                Finding(ERROR, "hdf5.dtype", f"dataset {name} has dtype {dtype} that no tensor has", name)
            )
            return None
        shape = tuple(item.shape)
        numel = int(np.prod(shape)) if shape else 1
        ref = StorageRef(name, DType(dtype), numel, "cpu", None)
        self.ckpt.storages[name] = ref
        return LazyTensor(ref, 0, shape, contiguous_strides(shape))

    def member(self, item, path_name: str) -> Any:
        value = self.done.get(item)
        if value is _IN_PROGRESS:  # a link to an enclosing group: no tree can hold that
            self.ckpt.findings.append(
                Finding(ERROR, "hdf5.cycle", f"{path_name} links back to a group that contains it", path_name)
            )
            return None
        if item in self.done:
            return value
        self.done[item] = _IN_PROGRESS
        if self.progress is not None:
            self.progress()
        is_group = isinstance(item, self.group_type)
        self.done[item] = self.group_value(item, path_name) if is_group else self.dataset(item, path_name)
        return self.done[item]

    def group_value(self, group, prefix: str) -> Any:
        json_names = set(json.loads(plain(group.attrs[JSON_ATTR]))) if JSON_ATTR in group.attrs else set()
        keys = {
            name: untag(k)
            for name, k in (json.loads(plain(group.attrs[KEYS_ATTR])).items() if KEYS_ATTR in group.attrs else ())
        }
        out: dict[Any, Any] = {}
        for name, value in group.attrs.items():
            if name in RESERVED:
                continue
            value = plain(value)
            out[name] = untag(json.loads(value)) if name in json_names else value
        for name, item in group.items():
            where = f"{prefix}/{name}" if prefix else name
            if item is None:  # a link h5py cannot resolve: damaged, or pointing at nothing
                raise KeyError(f"{where}: a link that leads to no object")
            out[name] = self.member(item, where)
        if ORDER_ATTR in group.attrs:
            order = json.loads(plain(group.attrs[ORDER_ATTR]))
            out = {name: out[name] for name in order if name in out} | out
        kind = plain(group.attrs.get(KIND_ATTR, "dict"))
        if kind in ("list", "tuple"):
            items = [out[str(i)] for i in range(len(out)) if str(i) in out]
            return items if kind == "list" else tuple(items)
        return {keys.get(name, name): value for name, value in out.items()}


# ---- writing
# ----------------------------------------------------------------------------------------------------------


def write_hdf5(
    tree: Any,
    path: Path,
    tensor_chunks: Callable[[LazyTensor], Iterable[bytes]],
    compress: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Write ``tree`` (dicts, lists, tuples, plain values, LazyTensors, numpy arrays) to a new HDF5 file.
    ``tensor_chunks`` yields a tensor's bytes in C order.  Returns the number of tensors written."""
    import h5py

    writer = _TreeWriter(tree if isinstance(tree, dict) else {"value": tree}, tensor_chunks, compress, on_bytes)
    with h5py.File(path, "w", libver=LIBVER, track_order=True) as handle:
        writer.fill(handle, writer.tree)
    return writer.written


def _attribute_name(key: Any, i: int) -> str:
    """``key`` where HDF5 can hold it as a name, else ``~i`` (the real key is kept in KEYS_ATTR)."""
    usable = isinstance(key, str) and key and "/" not in key and key != "." and key not in RESERVED
    return key if usable and not key.startswith("~") else f"~{i}"


class _TreeWriter:
    """Dicts as groups, plain values as attributes, tensors and arrays as datasets; an object shared in the tree
    is written once and hard-linked under its other names."""

    def __init__(self, tree: dict, tensor_chunks, compress: bool, on_bytes):
        self.tree, self.tensor_chunks, self.compress, self.on_bytes = tree, tensor_chunks, compress, on_bytes
        self.written = 0
        self.shared = shared_objects(tree)
        self.first: dict[int, Any] = {}  # id of a shared object -> the group / dataset it was written as

    def put(self, group, name: str, value: Any) -> None:
        if id(value) in self.first:
            group[name] = self.first[id(value)]  # a hard link: the same object, stored once
            return
        self.put_new(group, name, value)
        if id(value) in self.shared:
            self.first[id(value)] = group[name]

    def put_new(self, group, name: str, value: Any) -> None:
        if isinstance(value, LazyTensor):
            _write_tensor(group, name, value, self.tensor_chunks(value), self.compress, self.on_bytes)
            self.written += 1
        elif isinstance(value, np.ndarray):
            if value.dtype.kind not in "biufc":
                raise TypeError(f"numpy array of {value.dtype}")
            ds = group.create_dataset(name, data=value)
            ds.attrs[KIND_ATTR] = "ndarray"
        elif isinstance(value, dict):
            self.fill(group.create_group(name, track_order=True), value)
        elif isinstance(value, (list, tuple)) and not is_plain(value, self.shared):
            sub = group.create_group(name, track_order=True)
            sub.attrs[KIND_ATTR] = "tuple" if isinstance(value, tuple) else "list"
            self.fill(sub, {str(i): v for i, v in enumerate(value)})
        else:
            raise AssertionError("plain values are attributes")

    def fill(self, group, mapping: dict) -> None:
        keys, json_names, attr_names, child_names, order = {}, [], [], [], []
        for i, (key, value) in enumerate(mapping.items()):
            name = _attribute_name(key, i)
            if name != key:
                keys[name] = tag(key)
            order.append(name)
            if not is_plain(value, self.shared):
                child_names.append(name)
                self.put(group, name, value)
                continue
            attr_names.append(name)
            if (
                isinstance(value, (bool, float))
                or (isinstance(value, str) and _utf8_ok(value))
                or (isinstance(value, int) and -(2**63) <= value < 2**63)
            ) or isinstance(value, np.generic):
                group.attrs[name] = value
            else:
                group.attrs[name] = json.dumps(tag(value))
                json_names.append(name)
        if keys:
            group.attrs[KEYS_ATTR] = json.dumps(keys)
        if json_names:
            group.attrs[JSON_ATTR] = json.dumps(json_names)
        if order != attr_names + child_names:  # the reader puts attributes first; record the real order
            group.attrs[ORDER_ATTR] = json.dumps(order)


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text  # HDF5 strings end at NUL


def _write_tensor(group, name: str, t: LazyTensor, chunks: Iterable[bytes], compress: bool, on_bytes) -> None:
    np_dtype = np.dtype(t.dtype.info.numpy or t.dtype.info.bits)  # dtypes numpy lacks: their bits
    shape = tuple(t.shape)
    filters = {}
    if t.numel and shape:  # HDF5 cannot chunk (so cannot checksum) scalars and empty datasets
        filters = {"chunks": True, "fletcher32": True}
        if compress:
            filters.update(compression="gzip", compression_opts=4, shuffle=True)
    ds = group.create_dataset(name, shape=shape, dtype=np_dtype, **filters)
    ds.attrs[DTYPE_ATTR] = str(t.dtype)
    if t.numel == 0:
        for _ in chunks:
            pass
        return
    if not shape:
        ds[()] = np.frombuffer(b"".join(chunks), dtype=np_dtype)[0]
        return
    row = np_dtype.itemsize * int(np.prod(shape[1:]))
    pending, start = bytearray(), 0
    for block in chunks:
        pending += block
        if on_bytes:
            on_bytes(len(block))
        rows = len(pending) // row
        if rows:
            ds[start : start + rows] = np.frombuffer(
                pending, dtype=np_dtype, count=rows * row // np_dtype.itemsize
            ).reshape((rows, *shape[1:]))
            del pending[: rows * row]
            start += rows
    if start != shape[0] or pending:
        raise OSError(f"tensor {name}: {start} of {shape[0]} rows written")


def write_converted(tree: Any, request: WriteRequest) -> None:
    """`ckpt convert`'s entry (formats/base.py): every tensor of a dtype HDF5 carries (natively or as bits),
    objects as their plain data (noted)."""
    refuse_unwritable(tree, request, "HDF5")
    tree = to_plain_tree(tree, request.notes)
    with atomic_path(request.out, replace=request.replace) as tmp:  # h5py writes to a path, not a file object
        write_hdf5(tree, tmp, request.source.tensor_chunks, request.compress, request.on_bytes)
