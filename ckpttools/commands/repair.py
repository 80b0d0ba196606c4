"""``ckpt repair IN -o OUT``: mend what can be mended, say exactly what could not, never touch IN.

* storages: every record is checked (present, whole, size, CRC32).  A truncated file whose central directory
  is gone is read by scanning local headers, so every intact record is recovered.  Storages that are lost
  are named by the tensors that use them; ``--from OTHER`` fills them from the same tensor (same path, dtype
  and shape) of another checkpoint, e.g. ``last.prev.pt`` or ``epochN.pt``, and the fill is recorded.
* names: ``module.`` / ``_orig_mod.`` prefixes are stripped from weight names.
* digest: a missing or stale content digest is rebuilt, only once every byte has passed its CRC32.

The result is written to a temporary file, verified with ``ckpt verify``, and only then renamed to OUT:
repair refuses to leave behind anything that would not pass.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpttools import layouts as L
from ckpttools.atomic import atomic_path, check_new_output, clear_stale, ensure_space
from ckpttools.commands._inputs import refuse_deep, refuse_unsafe
from ckpttools.commands.verify import file_identity, verify, verify_opened
from ckpttools.digest import DIGEST_KEY, KNOWN_ALGORITHMS, lazy_digest, refresh_digest
from ckpttools.errors import FormatLimit, UsageError
from ckpttools.formats import torchzip, zipformat, ziprecover
from ckpttools.formats.base import to_plain_tree
from ckpttools.formats.registry import ZIP, Checkpoint, open_checkpoint
from ckpttools.formats.storage_scan import StorageScanner
from ckpttools.report import ERROR, counted
from ckpttools.tensors import LazyTensor, StorageRef, TensorSource
from ckpttools.trainers.base import now
from ckpttools.trainers.registry import rules_for
from ckpttools.trees import iter_tensors
from ckpttools.weights import unwrapped, weight_dicts


@dataclass
class RepairResult:
    input: str
    output: str
    repaired: bool = False  # OUT was written and passes verify
    actions: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # tensors whose bytes are gone and were not filled
    filled: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why OUT was not written

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "notes": self.actions}


def repair(
    src: str | os.PathLike,
    out: str | os.PathLike,
    from_: str | os.PathLike | None = None,
    strip_prefix: bool = True,
    force: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    allow_unsafe: bool = False,
) -> RepairResult:
    src, out = Path(src), Path(out)
    backup_path = Path(from_) if from_ else None
    check_new_output(out, [src] + ([backup_path] if backup_path else []), force)
    result = RepairResult(str(src), str(out))
    opened = file_identity(src)
    ckpt = open_checkpoint(src)
    backup = open_checkpoint(backup_path) if backup_path else None  # a missing --from is a usage error, first
    unknown = [f for f in ckpt.findings if f.code == "tensor.unknown-dtype"]
    if unknown:  # a limit of this version, not damage: nothing to repair, and nothing to fill from a backup
        raise FormatLimit(f"{src}: {unknown[0].message}; nothing written")
    if ckpt.tree is None:
        messages = [f.message for f in ckpt.findings if f.severity == ERROR]
        result.problems.append(
            "the pickle that describes the tensors is lost or damaged"
            + (f" ({messages[0]})" if messages else "")
            + "; nothing can be rebuilt from this file: use the previous checkpoint "
            "(last.prev.pt) or an epochN.pt"
        )
        return result
    dangerous = refuse_unsafe(ckpt, "repair", allow_unsafe)
    refuse_deep(ckpt, "repair")
    if dangerous:  # --allow-unsafe: data only
        ckpt.tree = to_plain_tree(ckpt.tree, [])
        result.actions.append(f"--allow-unsafe: written as plain data only; not carried: {', '.join(dangerous[:5])}")
    if (
        not dangerous
        and _only_the_directory_is_damaged(ckpt, strip_prefix)
        and _rebuild_directory(src, out, result, force)
    ):
        return result
    if any(f.code == "zip.no-central-directory" for f in ckpt.findings):
        result.actions.append("zip end records were missing: records recovered by scanning local headers")

    source = TensorSource(ckpt)
    intact = not dangerous and _passes_verify(ckpt, on_bytes)  # then nothing is lost: no storage to look at again
    if not intact:
        _fill_lost(ckpt, backup, source, result, on_bytes)
    if result.lost:
        hint = " (give --from last.prev.pt or an epochN.pt to fill them)" if backup_path is None else ""
        result.problems.append(f"{counted(len(result.lost), 'tensor')} lost{hint}")
        return result

    tree = ckpt.tree
    if strip_prefix:
        renamed = _strip_prefixes(tree)
        result.actions.extend(renamed)
    if result.filled and isinstance(tree, dict) and isinstance(tree.get("history"), list):
        tree["history"].append(
            {
                "event": "repair",
                "date": now(),
                "filled_from": str(backup_path),
                "tensors": list(result.filled),
            }
        )
    _fix_digest(tree, source, result, changed=bool(result.filled or any("stripped" in a for a in result.actions)))
    if ckpt.format != ZIP:
        result.actions.append(f"{ckpt.format} input written as a torch zip checkpoint")
    result.actions.extend(clear_stale(out.parent))
    if intact and not result.actions and _copy_intact(ckpt, opened, out, force):
        result.repaired = True  # nothing to mend: a byte copy, verified (re-writing it would only cost time)
        result.actions.append("nothing needed mending: OUT is a verified copy")
        return result
    ensure_space(out, sum(r.nbytes for r in {id(t.storage): t.storage for _, t in iter_tensors(tree)}.values()))
    _write_verified(tree, out, source, result, on_bytes, force)
    return result


def _fill_lost(ckpt: Checkpoint, backup: Checkpoint | None, source: TensorSource, result: RepairResult, on_bytes):
    """Recover what records can be recovered; fill each storage still lost from ``backup`` (same name, shape,
    dtype) or name its tensors in ``result.lost``."""
    lost = _recover_records(ckpt, _lost_storages(ckpt, on_bytes), result)
    if not lost:
        return
    users = _users(ckpt)
    _check_backup(backup)
    theirs = _by_name(backup) if backup else {}
    backup_source = TensorSource(backup) if backup else None
    mine = dict(iter_tensors(ckpt.tree))
    for ref, why in lost:
        names = users.get(id(ref), [f"storage {ref.key}"])
        if backup is not None and _fill(ref, names, mine, theirs, source, backup_source, result):
            continue
        result.lost.extend(f"{name} ({why})" for name in names)


def _only_the_directory_is_damaged(ckpt: Checkpoint, strip_prefix: bool) -> bool:
    """The zip's directory is the one problem, and nothing else would be changed (no prefix to strip)."""
    codes = {f.code for f in ckpt.findings if f.severity == ERROR}
    if ckpt.format != ZIP or codes != {"zip.no-central-directory"}:
        return False
    if strip_prefix:
        dicts = weight_dicts(ckpt.tree, L.recognise(ckpt.tree))
        if any(isinstance(k, str) and _normalise(k) != k for _, weights in dicts for k in weights):
            return False
    return True


def _rebuild_directory(src: Path, out: Path, result: RepairResult, force: bool) -> bool:
    """Every record intact, only the central directory damaged (a zeroed page): write the file with its
    directory rebuilt from the local headers, every other byte as it was -- the original file, bit for bit.
    False (nothing written) when the directory cannot be rebuilt that way; the caller rewrites the file."""
    patches = ziprecover.rebuild_central_directory(src)
    if patches is None or not _write_patched(src, out, patches, force):
        return False
    result.repaired = True
    result.actions.append(
        "central directory rebuilt from the local headers (every record passed its CRC32; "
        "every other byte kept as it was)"
    )
    return True


def _write_patched(
    src: Path, out: Path, patches: list[tuple[int, bytes]], force: bool, passes: Callable[[Path], bool] | None = None
) -> bool:
    """OUT = the bytes of IN with ``patches`` applied, published only if ``passes(tmp)`` (default: it passes
    verify)."""
    passes = passes or (lambda tmp: not verify(tmp).errors)
    published = [False]

    def check(tmp: Path) -> bool:
        published[0] = passes(tmp)
        return published[0]

    ensure_space(out, src.stat().st_size)
    with atomic_path(out, verify=check, replace=force) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 8 << 20)
        for offset, data in patches:
            fout.seek(offset)
            fout.write(data)
    return published[0]


def _passes_verify(ckpt: Checkpoint, on_bytes: Callable[[int], None] | None) -> bool:
    """A torch zip with no container finding that passes every check of ``verify``, judged on the checkpoint
    already open (a large file is read once)."""
    if ckpt.format != ZIP or ckpt.findings:
        return False
    shown = [0]

    def progress(done: int, _total: int) -> None:
        if on_bytes:
            on_bytes(done - shown[0])
        shown[0] = done

    return not verify_opened(ckpt, progress).errors


def _copy_intact(ckpt: Checkpoint, opened: tuple, out: Path, force: bool) -> bool:
    """OUT = a byte copy of an input that passed every check of ``verify``: published only if the copy has the
    input's bytes and the input is still the file that was opened and checked.  False (nothing written)
    otherwise."""
    src = ckpt.path
    return _write_patched(
        src, out, [], force, lambda tmp: file_identity(src) == opened and filecmp.cmp(src, tmp, shallow=False)
    )


def _recover_records(
    ckpt: Checkpoint, lost: list[tuple[StorageRef, str]], result: RepairResult
) -> list[tuple[StorageRef, str]]:
    """Of the storages that looked lost, those whose bytes are intact although the zip metadata locating them is
    damaged (a central-directory or local-header field, or an entry missing from the central directory): found
    again, so no intact tensor is ever reported lost or filled from a backup.  Returns the ones still lost."""
    if ckpt.format != ZIP or ckpt.record_of is None or not lost:
        return lost
    scanned = ziprecover.scan_local_headers(ckpt.path)
    still = []
    for ref, why in lost:
        record = ckpt.record_of(ref)
        if record is None:  # absent from the central directory: look for it by name at the local headers
            name = ckpt.record_name_of(ref) if ckpt.record_name_of else None
            found = next(
                (
                    r
                    for r in scanned
                    if r.name == name
                    and not r.truncated
                    and r.crc is not None
                    and zipformat.record_crc(ckpt.path, r) == r.crc
                ),
                None,
            )
            how = "missing from the central directory; found at its local header (CRC32 passes)"
        else:
            name, found = record.name, ziprecover.locate_intact(ckpt.path, record, scanned)
            how = "the zip metadata locating it was damaged; its bytes, which pass their CRC32, were found again"
        if found is None or found is record or found.size != ref.nbytes:
            still.append((ref, why))
            continue
        ckpt.records[name] = found
        result.actions.append(f"{name}: {how}")
    return still


def _users(ckpt: Checkpoint) -> dict[int, list[str]]:
    by: dict[int, list[str]] = {}
    for where, t in iter_tensors(ckpt.tree):
        by.setdefault(id(t.storage), []).append(where)
    return by


def _lost_storages(ckpt: Checkpoint, on_bytes) -> list[tuple[StorageRef, str]]:
    """Storages whose bytes are not all there and intact, with the reason."""
    lost = []
    scanner = StorageScanner(ckpt, on_bytes=on_bytes, leaves=False)  # CRC32s and counts only
    refs = {id(t.storage): t.storage for _, t in iter_tensors(ckpt.tree)}
    for ref in refs.values():
        record = ckpt.record_of(ref) if ckpt.record_of else None
        if ckpt.record_of is not None:
            if record is None:
                lost.append((ref, "record missing"))
                continue
            if record.truncated:
                lost.append((ref, "record cut off"))
                continue
            if record.size != ref.nbytes:
                lost.append((ref, f"record holds {record.size} of {ref.nbytes} bytes"))
                continue
        try:
            scanned = scanner.scan(ref)
        except OSError as exc:
            lost.append((ref, f"unreadable: {exc}"))
            continue
        if record is not None and record.crc is not None and scanned.crc != record.crc:
            lost.append((ref, "CRC32 mismatch"))
        elif scanned.bytes_read != ref.nbytes:
            lost.append((ref, f"{scanned.bytes_read} of {ref.nbytes} bytes readable"))
    return lost


def _check_backup(backup: Checkpoint | None) -> None:
    if backup is None:
        return
    if backup.tree is None:
        raise UsageError(f"{backup.path}: cannot be read either ({[f.message for f in backup.findings][:1]})")
    refuse_unsafe(backup, "fill from")


def _normalise(name: str) -> str:
    return "/".join(unwrapped(part) for part in name.split("/"))


def _by_name(ckpt: Checkpoint) -> dict[str, LazyTensor]:
    """Tensors by path, also under their prefix-free names (a backup saved from a DDP-wrapped model)."""
    named = dict(iter_tensors(ckpt.tree))
    return {**{_normalise(k): t for k, t in named.items()}, **named}


def _fill(
    ref: StorageRef,
    names: list[str],
    mine: dict[str, LazyTensor],
    theirs: dict[str, LazyTensor],
    source: TensorSource,
    backup: TensorSource,
    result: RepairResult,
) -> bool:
    """Fill a lost storage from the backup's tensor of the same name, dtype and shape; only a storage that one
    tensor uses whole can be filled that way (a storage shared by several views cannot be rebuilt from one)."""
    if len(names) != 1:
        return False
    name = names[0]
    other, ours = theirs.get(name) or theirs.get(_normalise(name)), mine.get(name)
    if other is None or ours is None or other.dtype != ours.dtype or tuple(other.shape) != tuple(ours.shape):
        return False
    if ours.storage_offset != 0 or ours.numel != ref.numel or not ours.is_contiguous_view():
        return False
    source.computed[id(ref)] = lambda t=other: b"".join(backup.tensor_chunks(t))  # read when OUT is written
    result.filled.append(name)
    result.actions.append(f"{name}: lost bytes filled from {backup.ckpt.path}")
    return True


def _strip_prefixes(tree: Any) -> list[str]:
    """Strip wrapper prefixes from the weight dicts, in place; one action line per dict changed."""
    actions = []
    candidates = weight_dicts(tree, L.recognise(tree))
    for key, weights in candidates:
        renamed = {k: _normalise(k) if isinstance(k, str) else k for k in weights}
        count = sum(1 for k, v in renamed.items() if k != v)
        if not count:
            continue
        if len(set(renamed.values())) != len(renamed):
            actions.append(f"{key or 'state dict'}: prefixes not stripped: names would collide")
            continue
        items = [(renamed[k], v) for k, v in weights.items()]
        weights.clear()
        weights.update(items)
        actions.append(f"{key or 'state dict'}: module. / _orig_mod. prefixes stripped from {counted(count, 'name')}")
    return actions


def _fix_digest(tree: Any, source: TensorSource, result: RepairResult, changed: bool) -> None:
    if not isinstance(tree, dict):
        return
    if DIGEST_KEY not in tree:
        if rules_for(L.recognise(tree)).rebuilds_missing_digest():
            tree[DIGEST_KEY] = None
            refresh_digest(tree, source)
            result.actions.append("content digest was missing: rebuilt")
        return
    record = tree[DIGEST_KEY] if isinstance(tree[DIGEST_KEY], dict) else {}
    recorded, algorithm = record.get("value"), record.get("algorithm")
    if changed:
        refresh_digest(tree, source)
        result.actions.append("content digest rebuilt for the repaired content")
    elif algorithm not in KNOWN_ALGORITHMS or lazy_digest(tree, source, algorithm) != recorded:
        refresh_digest(tree, source)
        result.actions.append("content digest did not match the (CRC-intact) content: rebuilt")


def _write_verified(tree: Any, out: Path, source: TensorSource, result: RepairResult, on_bytes, force: bool) -> None:
    def passes(tmp: Path) -> bool:
        errors = [f"{f.code}: {f.message}" for f in verify(tmp).errors]
        if errors:
            result.problems.append(f"the repaired file would not pass `ckpt verify` ({errors[0]}); nothing written")
        return not errors

    with atomic_path(out, verify=passes, replace=force) as tmp:
        torchzip.write_file(tree, tmp, source, on_bytes=on_bytes)
    if result.problems:
        return
    result.repaired = True
    if not result.actions:
        result.actions.append("nothing needed mending: OUT is a verified copy")
