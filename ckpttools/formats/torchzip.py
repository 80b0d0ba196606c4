"""The ``torch.save`` zip container: read it as torch reads it, and write it as torch writes it.

``torch.save`` writes an uncompressed zip: ``<top>/data.pkl`` (the pickle), ``<top>/data/<key>`` (one record
per storage), ``<top>/byteorder``, ``<top>/version``, ``<top>/.data/serialization_id``.  The top folder name
is arbitrary (the file's stem by default); torch takes it from the first record.  The raw zip records (and
every byte of the file accounted for) come from ``ziprecords``.

Reading: every pickle in the archive is scanned (``data.pkl`` and any other record that is a pickle), then
``data.pkl`` is unpickled inertly; a second record of the same name is refused as ambiguous (torch's reader
may take either).

Writing (``write_torch_zip``): the same archive ``torch.save`` would write, from a reader tree, one storage at
a time and without torch.  The pickle is produced by Python's own pickler, taught three things:

* ``LazyTensor`` -> ``torch._utils._rebuild_tensor_v2`` (``_rebuild_parameter`` around it for parameters),
  the storage as a persistent id, exactly as torch writes them, so ``torch.load(weights_only=True)`` reads it;
* ``DType`` -> the ``torch.<dtype>`` global;
* placeholders (classes that were never imported) -> the same global reference and the same construction
  (NEWOBJ / REDUCE / ``copyreg._reconstructor``, BUILD state, list and dict items) they were read from.
  Nothing is imported to do that: the reference is written by name.  Callers make sure no reference the
  policy calls dangerous reaches the writer (``commands/_inputs.py``).
"""

from __future__ import annotations

import collections
import copyreg
import hashlib
import io
import pickle
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from ckpttools.atomic import atomic_write
from ckpttools.errors import OtherArchive
from ckpttools.formats import pt2, torch_names, ziprecords
from ckpttools.formats.base import Checkpoint, WriteRequest, storage_from_pid
from ckpttools.formats.zipwriter import StoredZipWriter
from ckpttools.objects import Placeholder, Reference, is_placeholder
from ckpttools.pickle import background
from ckpttools.pickle.scan import looks_like_pickle, scan_pickle
from ckpttools.report import ERROR, WARNING, Finding
from ckpttools.tensors import DTYPES, DType, LazyTensor, RebuiltTensor, StorageRef, TorchConstant, TorchLayout

NAME = "torch-zip"
MAX_EXTRA_PICKLE = 256 << 20  # scan other pickle records up to this size


def detect(path: Path, head: bytes) -> bool:
    return head[:4] in (ziprecords.LOCAL_MAGIC, ziprecords.EOCD_MAGIC)


def read(path: Path) -> Checkpoint:
    return open_embedded(path, 0, None)


def open_embedded(path: Path, base: int = 0, length: int | None = None) -> Checkpoint:
    """The torch zip in ``path`` (or embedded at ``base``, ``length`` bytes long: how DCP stores each item)."""
    ckpt = Checkpoint(path, NAME)
    early: list[tuple[bytes, Any]] = []  # (bytes, scan) of a large data.pkl met first: scanned beside the checks

    def scan_early(record: ziprecords.Record, data: bytes) -> None:
        if record.name.endswith("data.pkl") and len(data) >= background.IN_BACKGROUND_FROM:
            early.append((data, background.start_scan(data)))

    records = _read_records(ckpt, path, base, length, scan_early)
    pkl_name = pickle_record_name([r.name for r in records])
    if pkl_name is None and pt2.is_pt2([r.name for r in records]) is not None:
        return pt2.read_records(ckpt, path, ckpt.records, pt2.is_pt2([r.name for r in records]))
    if pkl_name is None and not ckpt.findings:
        other = other_archive([r.name for r in records])
        if other:  # an intact archive of another kind: declined, never called damaged
            raise OtherArchive(f"{path}: {other}, not a torch.save checkpoint; declined (its bytes were not judged)")
    if pkl_name is None:
        ckpt.findings.append(
            Finding(
                ERROR,
                "zip.no-pickle",
                "no data.pkl record: not a torch.save checkpoint or the record is lost",
                "data.pkl",
            )
        )
        _scan_other_pickles(ckpt, path, None, records)
        return ckpt
    top = pkl_name[: -len("data.pkl")]
    _scan_other_pickles(ckpt, path, pkl_name, records)
    data = None if ckpt.records[pkl_name].truncated else _intact_pickle(ckpt, path, pkl_name, base)
    if data is None:
        return ckpt
    byteorder = ckpt.records.get(top + "byteorder")
    if byteorder is not None and not byteorder.truncated and ziprecords.read_record(path, byteorder).strip() == b"big":
        ckpt.findings.append(
            Finding(
                WARNING,
                "zip.big-endian",
                "tensors were saved big-endian; values are read as little-endian here",
                top + "byteorder",
            )
        )

    def reader(ref: StorageRef) -> bytes:
        record = ckpt.record_of(ref)
        if record is None or record.truncated:
            raise OSError(f"storage record for {ref.key} is missing or truncated")
        return ziprecords.read_record(path, record)

    started = next((scan for scanned, scan in early if scanned == data), None)  # only for the very same bytes
    early.clear()  # one not used (a damaged directory pointed elsewhere) stops its child when dropped
    ckpt.tree = ckpt.read_pickle(data, pkl_name, lambda pid: storage_from_pid(ckpt, pid, reader), started)
    ckpt.record_of = lambda ref: ckpt.records.get(top + "data/" + ref.key)
    ckpt.record_name_of = lambda ref: top + "data/" + ref.key

    records = ziprecords.RecordReader(path)

    def iter_storage(ref: StorageRef, chunk: int):
        record = ckpt.record_of(ref)
        return records.chunks(record, chunk) if record and not record.truncated else iter(())

    ckpt.iter_storage = iter_storage
    return ckpt


def _read_records(
    ckpt: Checkpoint, path: Path, base: int, length: int | None, on_first: ziprecords.FirstRecord | None = None
) -> list:
    """The zip's records, with a finding for each problem of the container; ``ckpt.records`` by name."""
    try:
        records, problems = ziprecords.read_records(path, base, length, on_first)
        ckpt.findings.extend(Finding(ERROR, p.code, p.message, p.where) for p in problems)
    except ziprecords.ZipStructureError as exc:
        records = exc.records
        complete = [r for r in records if not r.truncated]
        ckpt.findings.append(
            Finding(
                ERROR,
                "zip.no-central-directory",
                f"zip end records missing or damaged ({exc}): the file is truncated or its end "
                f"is corrupt; {len(complete)} complete record(s) found by scanning "
                f"(`ckpt repair` can salvage them)",
                "central directory",
            )
        )
        for r in records:
            if r.truncated:
                ckpt.findings.append(Finding(ERROR, "zip.record-truncated", f"record {r.name} is cut off", r.name))
    _settle_names(records)
    unverifiable = [r for r in records if r.crc == 0 and r.size > 0]
    if unverifiable:
        # torch.save with serialization config save.compute_crc32 = False writes 0 in every CRC field: the
        # bytes are fine as far as anyone can tell, just not verifiable.  Treated as unknown, said once.
        for r in unverifiable:
            r.crc = None
        ckpt.findings.append(
            Finding(
                WARNING,
                "zip.crc-not-computed",
                f"{len(unverifiable)} record(s) carry CRC32 0: "
                "the writer did not compute checksums (torch's compute_crc32 = False), so "
                "their bytes cannot be verified; everything else was checked",
                "central directory",
            )
        )
    for name, n in Counter(r.name for r in records).items():
        if n > 1:
            ckpt.findings.append(
                Finding(
                    ERROR,
                    "zip.duplicate-name",
                    f"{n} records named {name}: torch.load may read any of them; the file is ambiguous",
                    name,
                )
            )
    ckpt.records = {}
    for r in records:
        ckpt.records.setdefault(r.name, r)  # the first, as a sequential reader sees it; duplicates are errors
    if ckpt.findings and base == 0:
        # damaged metadata may have hidden whole records (a zeroed central-directory page): add the ones a
        # local-header scan still finds complete, so what is intact can be described and repaired
        for r in ziprecords.scan_local_headers(path):
            if r.name not in ckpt.records and not r.truncated and r.crc is not None:
                ckpt.records[r.name] = r
                records.append(r)
    return records  # every record read, duplicates of a name included (each is judged: _scan_other_pickles)


def _intact_pickle(ckpt: Checkpoint, path: Path, pkl_name: str, base: int) -> bytes | None:
    """The pickle record's bytes, from an intact copy where only the metadata around them is damaged; None
    when they fail their CRC32 (then only scanned for what they name)."""
    pkl = ckpt.records[pkl_name]
    data = ziprecords.read_record(path, pkl)
    if pkl.crc is not None and pkl.crc != 0 and ziprecords.crc32(data) != pkl.crc and base == 0:
        # the pickle's bytes may be whole and only the metadata around them damaged (already reported)
        intact = ziprecords.locate_intact(path, pkl, ziprecords.scan_local_headers(path))
        if intact is not None:
            ckpt.records[pkl_name] = pkl = intact
            data = ziprecords.read_record(path, pkl)
    if pkl.crc is not None and pkl.crc != 0 and ziprecords.crc32(data) != pkl.crc:
        # a damaged pickle describes nothing reliable, and unpickling garbage can cost minutes: scan it for
        # what it names and stop there
        scan = scan_pickle(data)
        scan.error = None  # where a damaged stream stops is damage (reported below), not a safety verdict
        ckpt.scans.append((pkl_name, scan))
        ckpt.findings.append(
            Finding(
                ERROR,
                "pickle.damaged",
                f"{pkl_name} fails its CRC32 check; it was not unpickled (what it names is still judged)",
                pkl_name,
            )
        )
        return None
    return data


def _settle_names(records: list) -> None:
    """Where a record's central-directory name and local-header name disagree (one of them is damaged), take
    the one no other record already has: a flipped bit that turns data/10 into data/12 must not make the bytes
    of storage 10 pass for storage 12."""
    for r in records:
        if r.local_name is None:
            continue
        others = {o.name for o in records if o is not r}
        if r.name in others and r.local_name not in others:
            r.name = r.local_name


# zip archives that are not torch.save checkpoints: (a record every such archive has, what it is)
OTHER_ARCHIVES = (
    ("archive_format", "a torch.export / AOTInductor package (.pt2) without a program"),
    ("model.weights.h5", "a Keras 3 model archive (.keras)"),
)


def other_archive(names: list[str]) -> str | None:
    for marker, what in OTHER_ARCHIVES:
        if any(n == marker or n.endswith("/" + marker) for n in names):
            return what
    return None


def pickle_record_name(names: list[str]) -> str | None:
    """The pickle torch loads: ``<top>/data.pkl`` where ``<top>`` is the first record's folder (torch's rule);
    else the shallowest ``data.pkl`` (a damaged or foreign archive that is still worth describing)."""
    if names and "/" in names[0]:
        first = names[0].split("/", 1)[0] + "/data.pkl"
        if first in names:
            return first
    candidates = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    return min(candidates, key=lambda n: (n.count("/"), len(n))) if candidates else None


def _scan_other_pickles(ckpt: Checkpoint, path: Path, main: str | None, records: list) -> None:
    """Every other record that holds a pickle (``extra/*.pkl``, a second ``data.pkl``, TorchScript's
    ``constants.pkl``, a record whose name another one also has) is judged too: another loader may unpickle it."""
    kept = ckpt.records.get(main) if main else None
    shadowed = [(r.name, r) for r in records if ckpt.records.get(r.name) is not r]  # torch.load may read any
    # each stretch of bytes judged once, however many entries point at it (a zip bomb's do); data.pkl's own
    # bytes are judged where it is unpickled
    spans = {(kept.data_offset, kept.stored_size)} if kept else set()
    for name, record in [*ckpt.records.items(), *shadowed]:
        short = name.split("/", 1)[1] if "/" in name else name
        if (
            record is kept
            or short.startswith("data/")
            or record.truncated
            or record.size > MAX_EXTRA_PICKLE
            or record.size == 0
            or (record.data_offset, record.stored_size) in spans
        ):
            continue
        spans.add((record.data_offset, record.stored_size))
        try:
            head = b"".join(ziprecords.iter_record_bytes(path, record, 64, 0, 64))
            if name.endswith(".pkl") or (head[:1] == b"\x80" and looks_like_pickle(head)):
                ckpt.scans.append((name, scan_pickle(ziprecords.read_record(path, record))))
        except (OSError, zlib.error):  # a record whose metadata is damaged: reported by the structure checks
            continue


# ---- writing -------------------------------------------------------------------------------------------------------

ALIGNMENT = 64  # torch aligns storage records so mmap=True loads can use them in place
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


def write_torch_zip(
    tree: Any,
    out: IO[bytes],
    chunks_of: Callable[[StorageRef], Iterable[bytes]],
    location: Callable[[StorageRef], str] | None = None,
    archive: str = "archive",
    on_bytes: Callable[[int], None] | None = None,
) -> list[StorageRef]:
    """Write ``tree`` to ``out`` (seekable) as torch.save does; each storage's bytes come from ``chunks_of``
    and must add up to its size.  Returns the storages written, in record order."""
    data_pkl, storages = pickle_tree(tree, location)
    zf = StoredZipWriter(out, ALIGNMENT)
    zf.add(f"{archive}/data.pkl", [data_pkl], len(data_pkl))
    for name, text in ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little")):
        zf.add(f"{archive}/{name}", [text], len(text))
    for key, ref in enumerate(storages):
        written = zf.add(f"{archive}/data/{key}", chunks_of(ref), ref.nbytes, on_bytes)
        if written != ref.nbytes:
            raise OSError(f"storage {ref.key}: {written} bytes read, {ref.nbytes} expected")
    zf.add(f"{archive}/version", [b"3\n"], 2)
    serial = hashlib.sha1(data_pkl).hexdigest()[:20].encode()  # deterministic: same content, same bytes
    zf.add(f"{archive}/.data/serialization_id", [serial], len(serial))
    zf.close()
    return storages


def write_file(
    tree: Any,
    out: Path,
    source,
    location: Callable[[StorageRef], str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    replace: bool = True,
) -> None:
    """``write_torch_zip`` into ``out`` atomically; storage bytes from ``source`` (a ``tensors.TensorSource``).
    ``replace=False``: an ``out`` that appears meanwhile is never overwritten."""
    with atomic_write(out, replace=replace) as f:
        write_torch_zip(tree, f, source.storage_chunks, location=location, on_bytes=on_bytes)


def write_converted(tree: Any, request: WriteRequest) -> None:
    """`ckpt convert`'s entry (formats/base.py): the whole tree, every tensor kind, streamed."""
    write_file(tree, request.out, request.source, on_bytes=request.on_bytes, replace=request.replace)
