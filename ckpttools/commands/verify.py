"""``ckpt verify``: is a checkpoint whole, safe and consistent?  Never executes it, never writes it."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpttools import layouts as L
from ckpttools.commands._consistency import check_consistency, check_layout
from ckpttools.digest import DIGEST_KEY, KNOWN_ALGORITHMS, _TensorLeaf, tree_digest
from ckpttools.errors import NotACheckpoint, OtherArchive, UnsafeInput
from ckpttools.formats import zipformat
from ckpttools.formats.base import regular_file_or_folder
from ckpttools.formats.confine import inside
from ckpttools.formats.pt2 import NAME as PT2
from ckpttools.formats.registry import ZIP, Checkpoint, folder_weights_files, index_findings, open_checkpoint
from ckpttools.formats.storage_scan import StorageScanner
from ckpttools.formats.torchzip import is_storage_record
from ckpttools.pickle.policy import CODE, DANGEROUS
from ckpttools.report import ERROR, INFO, WARNING, Report, counted
from ckpttools.tensors import LazyTensor, StorageRef, tensor_bytes
from ckpttools.trainers.registry import rules_for
from ckpttools.trees import iter_tensors

METADATA_RECORDS = (
    "byteorder",
    "version",
    ".data/version",
    ".data/serialization_id",
    ".format_version",
    ".storage_alignment",
)


def verify(path: str | os.PathLike, progress: Callable[[int, int], None] | None = None) -> Report:
    """Check ``path``; returns a Report (findings with severity, code, message, where).

    Raises MissingPath for a missing path and NotACheckpoint for what is not a regular file or folder;
    everything else about the file is a finding."""
    path = Path(path)
    for _ in range(REREADS + 1):
        before = file_identity(path)
        report = _verify_once(path, progress)
        if file_identity(path) == before:
            return report
        # the file was replaced while it was read (a trainer's atomic save): its parts may come from two
        # versions, so the verdict would be about neither; read the new one again
    # every read mixed versions: what it found is about no file that existed, so none of it is reported
    unverified = Report(str(path))
    unverified.add(
        ERROR,
        "file.changed-while-reading",
        f"{path}: not verified: it was replaced {REREADS + 1} times while it was being read (a writer saves it "
        "that often); verify a copy (cp it first), or once the writer has stopped",
        str(path),
    )
    return unverified


REREADS = 3


def file_identity(path: Path) -> tuple:
    """What changes when a file is replaced or rewritten (inode, mtime, size)."""
    st = regular_file_or_folder(path)
    return (st.st_ino, st.st_mtime_ns, st.st_size) if path.is_file() else (st.st_ino,)


def _verify_once(path: Path, progress) -> Report:
    return _guarded(_verify, path, Report(str(path)), progress)


def _guarded(check: Callable[[Any, Report, Any], Report], subject: Any, report: Report, progress) -> Report:
    """``check(subject, report, progress)``; damage the checks did not anticipate still ends as a finding, never
    a traceback."""
    try:
        return check(subject, report, progress)
    except READ_ERRORS as exc:
        report.add(ERROR, "file.unreadable", f"reading stopped: {exc.__class__.__name__}: {exc}", report.path)
        return report


READ_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    OverflowError,
    MemoryError,
    RecursionError,
    EOFError,
    UnicodeError,
)


def _verify(path: Path, report: Report, progress) -> Report:
    folder = L.recognise_folder(path)
    if folder and folder != L.DCP_LAYOUT:
        return _verify_folder(path, folder, report, progress)
    try:
        ckpt = open_checkpoint(path)
    except OtherArchive:
        raise  # exit 2 with its one line: declined, not damaged
    except NotACheckpoint as exc:
        report.add(ERROR, "file.not-a-checkpoint", str(exc), str(path))
        return report
    return _check(ckpt, report, progress)


def verify_opened(ckpt: Checkpoint, progress: Callable[[int, int], None] | None = None) -> Report:
    """Every check of ``verify`` on a checkpoint the caller has opened (``repair`` judging the copy it makes of
    an intact file by the file itself: the same bytes, read once).  A file replaced meanwhile is the caller's to
    notice."""
    return _guarded(_check, ckpt, Report(str(ckpt.path)), progress)


def _check(ckpt: Checkpoint, report: Report, progress) -> Report:
    report.format = ckpt.format
    report.extend(ckpt.findings)
    report.layout = L.recognise_checkpoint(ckpt)
    total = sum(r.nbytes for r in ckpt.storages.values())
    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    scanner = StorageScanner(ckpt, on_bytes=on_bytes, leaves=_carries_digest(ckpt.tree))
    scanner.scan_all(ckpt.storages.values())  # one pass: CRC32, NaN/Inf and digest leaves, on every core
    _check_digest(ckpt, report, scanner)
    for ref in ckpt.storages.values():  # storages the digest walk did not reach
        try:
            scanner.scan(ref)
        except OSError as exc:  # e.g. an HDF5 fletcher32 checksum failure
            report.add(ERROR, "storage.unreadable", f"cannot read storage {ref.key}: {exc}", ref.key)
    _check_storages(ckpt, report, scanner)
    if ckpt.format in (ZIP, PT2):
        _check_other_records(ckpt, report)
    check_layout(ckpt, report)
    check_consistency(ckpt, report)
    check_safety(ckpt, report)  # last: a large pickle's scan has run beside the checks above (pickle.background)
    return report


# ---- safety ---------------------------------------------------------------------------------------------------------


def check_safety(ckpt: Checkpoint, report: Report) -> None:
    """Every pickle's references, judged by the one policy (``ckpttools.pickle.policy``)."""
    listed, seen = [], set()
    for where, j in ckpt.safety():
        key = (j.reference, j.status, j.reason)
        if key in seen:
            continue
        seen.add(key)
        listed.append({"reference": j.reference, "status": j.status, "uses": list(j.uses), "where": where})
        if j.status == DANGEROUS:
            report.add(ERROR, "safety.dangerous-reference", j.reason, where)
        elif j.status == CODE:
            report.add(WARNING, "safety.code-reference", j.reason, where)
    report.facts["references"] = listed


# ---- bytes: storages, records, digest
# -----------------------------------------------------------------------------------


def _tensor_paths_by_storage(tensors: list[tuple[str, LazyTensor]]) -> dict[int, list[str]]:
    by: dict[int, list[str]] = defaultdict(list)
    for where, t in tensors:
        by[id(t.storage)].append(where)
    return by


# where trainers keep monitor and callback state, in which inf is a legitimate value (a checkpoint callback
# starts kth_value / best_model_score at +-inf): NaN/Inf is judged in weights, buffers and optimizer state only
MONITOR_KEYS = frozenset(
    {
        "callbacks",
        "loops",
        "best_model_score",
        "best_k_models",
        "kth_value",
        "current_score",
        "best_fitness",
        "train_metrics",
        "metrics",
        "loggers",
    }
)


def _is_monitor_state(path: str) -> bool:
    parts = path.replace("[", "/").split("/")
    return bool(parts) and (parts[0] in MONITOR_KEYS or any(p.split("{")[0] in MONITOR_KEYS for p in parts[-2:]))


def _check_storages(ckpt: Checkpoint, report: Report, scanner: StorageScanner) -> None:
    tensors = list(iter_tensors(ckpt.tree))
    users: dict[int, list[str]] = {}

    def users_of(ref: StorageRef) -> list[str]:  # the tensors of a storage, mapped only once one is reported
        if not users:
            users.update(_tensor_paths_by_storage(tensors))
        return users.get(id(ref), [])

    def where_of(ref: StorageRef) -> str:
        return ", ".join(users_of(ref)[:3]) or f"storage {ref.key}"

    for key, ref in ckpt.storages.items():
        result = scanner.results.get(id(ref))
        if ckpt.record_of is not None:
            record = ckpt.record_of(ref)
            if record is None:
                lost = f"storage {key} has no record; its tensors are lost"
                report.add(ERROR, "zip.record-missing", lost, where_of(ref))
                continue
            if record.truncated:
                continue  # reported when the container was opened
            if record.size != ref.nbytes:
                report.add(
                    ERROR,
                    "storage.size-mismatch",
                    f"record {record.name} holds {record.size} bytes, the "
                    f"pickle says {ref.numel} x {ref.dtype} = {ref.nbytes}",
                    where_of(ref),
                )
            if result and result.complete and record.crc is not None and result.crc != record.crc:
                report.add(
                    ERROR,
                    "zip.crc-mismatch",
                    f"record {record.name}: CRC32 {result.crc:08x} != recorded "
                    f"{record.crc:08x}: its bytes are damaged (torch.load would not notice)",
                    where_of(ref),
                )
        if result and result.nonfinite and not all(_is_monitor_state(p) for p in users_of(ref) or ["?"]):
            report.add(
                ERROR,
                "values.nonfinite",
                f"{counted(result.nonfinite, 'NaN/Inf value')} in {ref.dtype} storage {key}",
                where_of(ref),
            )
    for where, t in tensors:
        if t.extent() > t.storage.numel:
            report.add(
                ERROR,
                "tensor.out-of-bounds",
                f"view needs {t.extent()} elements of a storage of {t.storage.numel}",
                where,
            )


def _check_other_records(ckpt: Checkpoint, report: Report) -> None:
    if ckpt.record_name_of is not None:  # by name: the records themselves are made only for the others
        storage_records = set(map(ckpt.record_name_of, ckpt.storages.values()))
    else:
        storage_records = {r.name for r in map(ckpt.record_of, ckpt.storages.values()) if r is not None}
    for name in ckpt.records:
        if name in storage_records:
            continue
        record = ckpt.records[name]
        if record.truncated:
            continue
        if record.crc is not None:
            crc = 0
            for block in zipformat.iter_record_bytes(ckpt.path, record) if record.size else ():
                crc = zipformat.crc32(block, crc)
            if crc != record.crc:
                report.add(
                    ERROR, "zip.crc-mismatch", f"record {name}: CRC32 {crc:08x} != recorded {record.crc:08x}", name
                )
        short = name.split("/", 1)[1] if "/" in name else name
        if ckpt.format == PT2:
            continue  # an export archive's records are its own (the CRC32 above is what is checked)
        if not name.endswith("data.pkl") and short not in METADATA_RECORDS and not is_storage_record(name):
            report.add(INFO, "zip.extra-record", f"record {name} is not part of a torch.save checkpoint", name)
        elif is_storage_record(name) and ckpt.tree is not None:  # (storage_records were skipped above)
            report.add(WARNING, "zip.unreferenced-record", f"storage record {name} is not used by the pickle", name)


def _carries_digest(tree: Any) -> bool:
    """Whether the checkpoint records a content digest of a known algorithm (the pass then takes its leaves)."""
    record = tree.get(DIGEST_KEY) if isinstance(tree, dict) else None
    return isinstance(record, dict) and record.get("algorithm") in KNOWN_ALGORITHMS


def _check_digest(ckpt: Checkpoint, report: Report, scanner: StorageScanner) -> None:
    tree = ckpt.tree
    if not isinstance(tree, dict) or DIGEST_KEY not in tree:
        rules = rules_for(L.recognise(tree))
        if rules.expects_digest(ckpt.format):
            report.add(
                WARNING,
                "digest.missing",
                f"{rules.title} checkpoint without a content digest (`ckpt repair` rebuilds it)",
                DIGEST_KEY,
            )
        return
    record = tree[DIGEST_KEY]
    if not isinstance(record, dict) or record.get("algorithm") not in KNOWN_ALGORITHMS:
        report.add(WARNING, "digest.unknown", f"digest algorithm {record!r} is not known here", DIGEST_KEY)
        return

    def leaf(value: Any):
        if not isinstance(value, LazyTensor):
            return None
        scanned = scanner.results.get(id(value.storage))
        covers = value.storage_offset == 0 and value.numel == value.storage.numel and value.is_contiguous_view()
        known = scanned.xxh3 if scanned is not None and scanned.complete and covers else None
        return _TensorLeaf(value.dtype, value.shape, lambda v=value: tensor_bytes(v, scanner.stream(v.storage)), known)

    try:
        actual = tree_digest(tree, leaf, record["algorithm"])
    except OSError as exc:
        report.add(ERROR, "digest.unreadable", f"digest not checked: {exc}", DIGEST_KEY)
        return
    report.facts["digest"] = actual
    if actual != record.get("value"):
        report.add(
            ERROR,
            "digest.mismatch",
            f"content digest {actual[:16]}… != recorded "
            f"{str(record.get('value'))[:16]}…: the content changed after it was saved",
            DIGEST_KEY,
        )


FOLDER_FILES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _verify_folder(path: Path, layout: str, report: Report, progress) -> Report:
    """A folder of checkpoint files (Hugging Face, Trainer checkpoint-N, Accelerate, DeepSpeed): every file is
    verified on its own, findings prefixed with its name; the step of a Trainer folder from trainer_state.json."""
    report.format, report.layout = "folder", layout
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FOLDER_FILES)
    files = [f for f in found if inside(path, f.relative_to(path).as_posix()) is not None]
    for f in sorted(set(found) - set(files)):
        report.add(
            ERROR,
            "folder.path-outside",
            f"{f.relative_to(path).as_posix()} is a link to outside the folder; not read",
            str(f.relative_to(path)),
        )
    try:
        weights = folder_weights_files(path)
    except NotACheckpoint as exc:
        weights = []
        report.add(ERROR, "layout.missing-key", str(exc), str(path))
    except UnsafeInput as exc:
        weights = []
        report.add(ERROR, "folder.path-outside", str(exc), str(path))
    report.findings.extend(index_findings(path))
    for f in files:
        sub = verify(f, progress)
        rel = f.relative_to(path).as_posix()
        for finding in sub.findings:
            if finding.code == "layout.unknown":
                continue  # a piece of a known folder layout (optimizer.pt, rng_state.pth): not a layout of its own
            finding.where = f"{rel}: {finding.where}" if finding.where else rel
            report.findings.append(finding)
        if f in weights:
            report.facts["parameter_count"] = report.facts.get("parameter_count", 0) + sub.facts.get(
                "parameter_count", 0
            )
    try:
        report.facts.update(L.folder_counters(path))
    except ValueError:
        report.add(
            ERROR, "layout.bad-metadata", "trainer_state.json is not valid JSON", str(path / "trainer_state.json")
        )
    return report
