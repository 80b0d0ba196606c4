"""The ``torch.save`` zip container: read it as torch reads it, and write it as torch writes it.

``torch.save`` writes an uncompressed zip: ``<top>/data.pkl`` (the pickle), ``<top>/data/<key>`` (one record
per storage), ``<top>/byteorder``, ``<top>/version``, ``<top>/.data/serialization_id``.  The top folder name
is arbitrary (the file's stem by default); torch takes it from the first record.  The raw zip records (and
every byte of the file accounted for) come from ``ziprecords`` (``zipformat``, ``ziprecover``).

Reading: every pickle in the archive is scanned (``data.pkl`` and any other record that is a pickle), then
``data.pkl`` is unpickled inertly; a second record of the same name is refused as ambiguous (torch's reader
may take either).

Writing (``write_torch_zip``): the same archive ``torch.save`` would write, from a reader tree, one storage at
a time and without torch.  The pickle (``torch_pickler.pickle_tree``) is produced by Python's own pickler,
taught three things:

* ``LazyTensor`` -> ``torch._utils._rebuild_tensor_v2`` (``_rebuild_parameter`` around it for parameters),
  the storage as a persistent id, exactly as torch writes them, so ``torch.load(weights_only=True)`` reads it;
* ``DType`` -> the ``torch.<dtype>`` global;
* placeholders (classes that were never imported) -> the same global reference and the same construction
  (NEWOBJ / REDUCE / ``copyreg._reconstructor``, BUILD state, list and dict items) they were read from.
  Nothing is imported to do that: the reference is written by name.  Callers make sure no reference the
  policy calls dangerous reaches the writer (``commands/_inputs.py``).
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from ckpttools.atomic import atomic_write
from ckpttools.errors import OtherArchive
from ckpttools.formats import pt2, zipformat, ziprecords, ziprecover
from ckpttools.formats.base import Checkpoint, WriteRequest, storage_from_pid
from ckpttools.formats.torch_pickler import pickle_tree
from ckpttools.formats.zipwriter import StoredZipWriter
from ckpttools.pickle import background
from ckpttools.pickle.scan import looks_like_pickle, scan_pickle
from ckpttools.report import ERROR, WARNING, Finding, counted
from ckpttools.tensors import StorageRef

NAME = "torch-zip"
MAX_EXTRA_PICKLE = 256 << 20  # scan other pickle records up to this size


def detect(path: Path, head: bytes) -> bool:
    return head[:4] in (zipformat.LOCAL_MAGIC, zipformat.EOCD_MAGIC)


def read(path: Path) -> Checkpoint:
    return open_embedded(path, 0, None)


def open_embedded(path: Path, base: int = 0, length: int | None = None) -> Checkpoint:
    """The torch zip in ``path`` (or embedded at ``base``, ``length`` bytes long: how DCP stores each item)."""
    ckpt = Checkpoint(path, NAME)
    early: list[tuple[bytes, Any]] = []  # (bytes, scan) of a large data.pkl met first: scanned beside the checks

    def scan_early(record: zipformat.Record, data: bytes) -> None:
        if record.name.endswith("data.pkl") and len(data) >= background.IN_BACKGROUND_FROM:
            # read again from the record if the child fails (its offsets are absolute by then: parse_zip)
            early.append((data, background.start_scan(data, lambda: zipformat.read_record(path, record))))

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
    del records  # the parsed Record objects: the table (ckpt.records) holds what they said, in a tenth the memory
    data = None if ckpt.records[pkl_name].truncated else _intact_pickle(ckpt, path, pkl_name, base)
    if data is None:
        return ckpt
    byteorder = ckpt.records.get(top + "byteorder")
    if byteorder is not None and not byteorder.truncated and zipformat.read_record(path, byteorder).strip() == b"big":
        ckpt.findings.append(
            Finding(
                WARNING,
                "zip.big-endian",
                "tensors were saved big-endian; values are read as little-endian here",
                top + "byteorder",
            )
        )

    record_reader = zipformat.RecordReader(path)  # one descriptor for every storage read of this checkpoint

    def reader(ref: StorageRef) -> bytes:
        record = ckpt.record_of(ref)
        if record is None or record.truncated:
            raise OSError(f"storage record for {ref.key} is missing or truncated")
        return b"".join(record_reader.chunks(record))

    started = next((scan for scanned, scan in early if scanned == data), None)  # only for the very same bytes
    early.clear()  # one not used (a damaged directory pointed elsewhere) stops its child when dropped
    ckpt.tree = ckpt.read_pickle(data, pkl_name, lambda pid: storage_from_pid(ckpt, pid, reader), started)
    ckpt.record_of = lambda ref: ckpt.records.get(top + "data/" + ref.key)
    ckpt.record_name_of = lambda ref: top + "data/" + ref.key

    def iter_storage(ref: StorageRef, chunk: int):
        record = ckpt.record_of(ref)
        return record_reader.chunks(record, chunk) if record and not record.truncated else iter(())

    ckpt.iter_storage = iter_storage
    return ckpt


def _read_records(
    ckpt: Checkpoint, path: Path, base: int, length: int | None, on_first: ziprecords.FirstRecord | None = None
) -> list:
    """The zip's records, with a finding for each problem of the container; ``ckpt.records`` by name."""
    try:
        records, problems = ziprecords.read_records(path, base, length, on_first)
        ckpt.findings.extend(Finding(ERROR, p.code, p.message, p.where) for p in problems)
    except zipformat.ZipStructureError as exc:
        records = exc.records
        complete = [r for r in records if not r.truncated]
        ckpt.findings.append(
            Finding(
                ERROR,
                "zip.no-central-directory",
                f"zip end records missing or damaged ({exc}): the file is truncated or its end "
                f"is corrupt; {counted(len(complete), 'complete record')} found by scanning "
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
                f"CRC32 0 in {counted(len(unverifiable), 'record')}: "
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
    ckpt.records = zipformat.RecordTable(records)  # the first of a name, as a sequential reader sees it
    if ckpt.findings and base == 0:
        # damaged metadata may have hidden whole records (a zeroed central-directory page): add the ones a
        # local-header scan still finds complete, so what is intact can be described and repaired
        for r in ziprecover.scan_local_headers(path):
            if r.name not in ckpt.records and not r.truncated and r.crc is not None:
                ckpt.records[r.name] = r
                records.append(r)
    return records  # every record read, duplicates of a name included (each is judged: _scan_other_pickles)


def _intact_pickle(ckpt: Checkpoint, path: Path, pkl_name: str, base: int) -> bytes | None:
    """The pickle record's bytes, from an intact copy where only the metadata around them is damaged; None
    when they fail their CRC32 (then only scanned for what they name)."""
    pkl = ckpt.records[pkl_name]
    data = zipformat.read_record(path, pkl)
    if pkl.crc is not None and pkl.crc != 0 and zipformat.crc32(data) != pkl.crc and base == 0:
        # the pickle's bytes may be whole and only the metadata around them damaged (already reported)
        intact = ziprecover.locate_intact(path, pkl, ziprecover.scan_local_headers(path))
        if intact is not None:
            ckpt.records[pkl_name] = pkl = intact
            data = zipformat.read_record(path, pkl)
    if pkl.crc is not None and pkl.crc != 0 and zipformat.crc32(data) != pkl.crc:
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
    # each stretch of bytes judged once, however many entries point at it (a zip bomb's do); data.pkl's own
    # bytes are judged where it is unpickled; storages are judged by their tensors, not here
    spans = {(kept.data_offset, kept.stored_size)} if kept else set()
    for name in ckpt.records:
        if name != main and not is_storage_record(name):
            _scan_if_pickle(ckpt, path, name, ckpt.records[name], spans)
    seen: set[str] = set()
    for record in records:  # the entries a name's first one shadows (the table keeps the first): torch.load
        if record.name in seen and not is_storage_record(record.name) and record != kept:  # may read any of them
            _scan_if_pickle(ckpt, path, record.name, record, spans)
        seen.add(record.name)


def is_storage_record(name: str) -> bool:
    """Whether a record's name is one of torch's storage records (``<archive>/data/<key>``)."""
    return (name.split("/", 1)[1] if "/" in name else name).startswith("data/")


def _scan_if_pickle(ckpt: Checkpoint, path: Path, name: str, record, spans: set) -> None:
    """Scan the record if it holds a pickle (by its name or its first bytes) and its bytes were not judged."""
    if record.truncated or record.size > MAX_EXTRA_PICKLE or record.size == 0:
        return
    if (record.data_offset, record.stored_size) in spans:
        return
    spans.add((record.data_offset, record.stored_size))
    try:
        head = b"".join(zipformat.iter_record_bytes(path, record, 64, 0, 64))
        if name.endswith(".pkl") or (head[:1] == b"\x80" and looks_like_pickle(head)):
            ckpt.scans.append((name, scan_pickle(zipformat.read_record(path, record))))
    except (OSError, zlib.error):  # a record whose metadata is damaged: reported by the structure checks
        return


# ---- writing -------------------------------------------------------------------------------------------------------

ALIGNMENT = 64  # torch aligns storage records so mmap=True loads can use them in place


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
    add_head_records(zf, data_pkl, archive)
    for key, ref in enumerate(storages):
        written = zf.add(f"{archive}/data/{key}", chunks_of(ref), ref.nbytes, on_bytes)
        if written != ref.nbytes:
            raise OSError(f"storage {ref.key}: {written} bytes read, {ref.nbytes} expected")
    add_tail_records(zf, data_pkl, archive)
    zf.close()
    return storages


def add_head_records(zf: StoredZipWriter, data_pkl: bytes, archive: str = "archive") -> None:
    """The records torch.save writes before the storages: the pickle, then three small ones."""
    zf.add(f"{archive}/data.pkl", [data_pkl], len(data_pkl))
    for name, text in ((".format_version", b"1"), (".storage_alignment", b"%d" % ALIGNMENT), ("byteorder", b"little")):
        zf.add(f"{archive}/{name}", [text], len(text))


def add_tail_records(zf: StoredZipWriter, data_pkl: bytes, archive: str = "archive") -> None:
    """The records torch.save writes after the storages (the central directory is ``zf.close()``)."""
    zf.add(f"{archive}/version", [b"3\n"], 2)
    serial = hashlib.sha1(data_pkl).hexdigest()[:20].encode()  # deterministic: same content, same bytes
    zf.add(f"{archive}/.data/serialization_id", [serial], len(serial))


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
