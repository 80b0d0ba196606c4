"""``ckpt diff A B``: what differs between two checkpoints, streaming one tensor pair at a time.

Tensors are matched by name within a section (model / ema / optimizer; for flat files such as safetensors or a
plain state dict, the weights).  Key prefixes that are only a wrapper's (``module.``, ``_orig_mod.``) are
normalised with a note.  A pair of zip records with the same CRC32 and size is very likely identical; the
bytes are still compared to confirm.  Values are compared chunk by chunk in float64, so memory does not
grow with the checkpoint.  Metadata (run arguments, counters, metrics) is compared with deepdiff.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckpttools import layouts as L
from ckpttools.formats.registry import Checkpoint, open_checkpoint
from ckpttools.objects import Placeholder
from ckpttools.tensors import DTYPES, LazyTensor, RebuiltTensor, expand_rebuilt, iter_nodes, iter_tensors, tensor_bytes
from ckpttools.trainers.base import GENERIC
from ckpttools.trainers.registry import rules_for

IDENTICAL, WITHIN, DIFFERENT = "identical", "within_tolerance", "different"
SECTIONS = ("model", "ema", "optimizer", "meta")
# differ between any two saves; listed, not judged (a trainer adds its own: TrainerRules.volatile_metadata)
VOLATILE_META = ("date", "history", "digest", "versions")
NUMPY = {d.name: np.dtype(d.numpy).type for d in DTYPES.values() if d.numpy and not d.name.startswith("complex")}
CHUNK_ELEMENTS = 1 << 21


@dataclass
class TensorDiff:
    name: str
    section: str
    shape_a: tuple | None = None
    shape_b: tuple | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    identical: bool = False
    max_abs: float = 0.0
    mean_abs: float = 0.0
    rel_l2: float = 0.0
    outside: int = 0
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class DiffReport:
    a: str
    b: str
    verdict: str = IDENTICAL
    only_in_a: list[dict] = field(default_factory=list)
    only_in_b: list[dict] = field(default_factory=list)
    changed: list[TensorDiff] = field(default_factory=list)
    same: int = 0
    equal_by_crc: int = 0  # of ``same``: records with the same size and CRC32, not read (--exact reads them)
    metadata: list[dict] = field(default_factory=list)
    ignored_metadata: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self, top: int | None = None) -> dict:
        changed = self.changed if top is None else self.changed[:top]
        return {
            "a": self.a,
            "b": self.b,
            "verdict": self.verdict,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "changed": [c.to_dict() for c in changed],
            "changed_count": len(self.changed),
            "identical_tensors": self.same,
            "equal_by_crc32": self.equal_by_crc,
            "metadata": self.metadata,
            "ignored_metadata": self.ignored_metadata,
            "notes": self.notes,
        }


# ---- which tensors: sections
# -------------------------------------------------------------------------------------------


def sections_of(ckpt: Checkpoint) -> dict[str, dict[str, LazyTensor]]:
    tree, layout = ckpt.tree, L.recognise(ckpt.tree, ckpt.path)
    out: dict[str, dict[str, LazyTensor]] = {"model": {}, "ema": {}, "optimizer": {}}
    sections = rules_for(layout).sections(tree)
    if sections is not None:
        for section, value in sections.items():
            if section == "optimizer":
                out[section] = dict(iter_tensors(value))
            else:
                out[section] = L.flat_tensors(value) if isinstance(value, dict) else L.module_tensors(value)
    else:
        found = L.weights_of(tree, layout)
        out["model"] = found[1] if found else dict(iter_tensors(tree))
    return {section: expand_rebuilt(names) for section, names in out.items()}


def _normalise(names: dict[str, LazyTensor]) -> tuple[dict[str, LazyTensor], str | None]:
    prefix = L.common_prefix(names)
    if prefix is None:
        return names, None
    return {k[len(prefix) :]: v for k, v in names.items()}, prefix


MAX_METADATA_NODES = 20_000  # values shown per checkpoint; past it a marker says how much was left out
MAX_METADATA_DEPTH = 100


def metadata_of(tree: Any) -> dict:
    """Everything that is not a tensor, as plain values (tensors become their dtype and shape).

    Bounded by construction: a container that appears again (a pickle's memo makes that cheap: ``{"a": d,
    "b": d}`` nested 64 times is 2**64 paths) becomes ``<same as PATH>``, nesting past MAX_METADATA_DEPTH
    and values past MAX_METADATA_NODES become markers."""
    seen: dict[int, str] = {}
    budget = [MAX_METADATA_NODES]

    def plain(v, path: str, depth: int):
        budget[0] -= 1
        if budget[0] < 0:
            return f"<left out: more than {MAX_METADATA_NODES} values>"
        if isinstance(v, LazyTensor):
            return f"<tensor {v.dtype} {list(v.shape)}>"
        if isinstance(v, Placeholder):
            return f"<{v._reference.qualname}>"
        if isinstance(v, RebuiltTensor):
            return repr(v)
        if not isinstance(v, (dict, list, tuple)):
            return v
        if id(v) in seen:
            return f"<same as {seen[id(v)]}>"
        seen[id(v)] = path
        if depth >= MAX_METADATA_DEPTH:
            return f"<nested deeper than {MAX_METADATA_DEPTH} levels>"
        if isinstance(v, dict):
            out: dict = {}
            for i, (k, x) in enumerate(v.items()):
                if budget[0] <= 0:
                    out["<left out>"] = f"{len(v) - i} more entries"
                    break
                if not isinstance(x, LazyTensor):
                    out[str(k)] = plain(x, f"{path}.{k}", depth + 1)
            return out
        items = []
        for i, x in enumerate(v):
            if budget[0] <= 0:
                items.append(f"<{len(v) - i} more values left out>")
                break
            items.append(plain(x, f"{path}[{i}]", depth + 1))
        return items

    if not isinstance(tree, dict):
        return {}
    skip = {"model", "ema", "optimizer", "state_dict", "optimizer_states", "rng"}
    out = {str(k): plain(v, str(k), 1) for k, v in tree.items() if k not in skip and not isinstance(v, LazyTensor)}
    # a quantized tensor's scale or a sparse tensor's shape is not in its parts' bytes: compared here
    rebuilt = {path: repr(t) for path, t in iter_nodes({k: tree[k] for k in skip if k in tree}, RebuiltTensor)}
    if rebuilt:
        out["<rebuilt tensors>"] = rebuilt
    return out


# ---- values
# ------------------------------------------------------------------------------------------------------------


def _as_float(chunk: bytes, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.frombuffer(chunk, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.frombuffer(chunk, NUMPY[dtype]).astype(np.float64)


def _rechunk(pieces: Iterator[bytes], size: int) -> Iterator[bytes]:
    """The same bytes in pieces of exactly ``size`` (the last may be shorter), so two tensors align."""
    pending = b""
    for piece in pieces:
        pending += piece
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


def _tensor_chunks(ckpt: Checkpoint, t: LazyTensor, chunk_bytes: int) -> Iterator[bytes]:
    return _rechunk(tensor_bytes(t, ckpt.storage_chunks(t.storage)), chunk_bytes)


def _record_fingerprint(ckpt: Checkpoint, t: LazyTensor):
    rec = ckpt.record_of(t.storage) if ckpt.record_of else None
    if rec is None or not t.is_contiguous_view() or t.storage_offset or t.numel != t.storage.numel:
        return None
    return (rec.crc, rec.size)


def _equal_by_crc(a_ck: Checkpoint, a: LazyTensor, b_ck: Checkpoint, b: LazyTensor) -> bool:
    """What ``compare_tensor`` calls "equal by CRC32" (same shape and dtype, whole-storage tensors whose zip
    records have the same CRC32 and size), decided without building its report."""
    if tuple(a.shape) != tuple(b.shape) or a.storage.dtype != b.storage.dtype:
        return False
    fp = _record_fingerprint(a_ck, a)
    return fp is not None and fp[0] is not None and fp == _record_fingerprint(b_ck, b)


def _sum_sq(chunk: bytes, dtype: str) -> float:
    if dtype in ("float32", "float64"):
        x = np.frombuffer(chunk, NUMPY[dtype])
        return float(np.dot(x, x))
    x = _as_float(chunk, dtype)
    return float(np.dot(x, x))


@dataclass
class _Acc:
    sum_abs: float = 0.0
    sum_sq_diff: float = 0.0
    sum_sq_a: float = 0.0


def _accumulate(d: TensorDiff, acc: _Acc, ca: bytes, cb: bytes, da: str, db: str, atol: float, rtol: float) -> None:
    xa, xb = _as_float(ca, da), _as_float(cb, db)
    fa, fb = np.isfinite(xa), np.isfinite(xb)
    d.nonfinite_a += int(xa.size - fa.sum())
    d.nonfinite_b += int(xb.size - fb.sum())
    both = fa & fb
    diff = np.abs(xa[both] - xb[both])
    if diff.size:
        d.max_abs = max(d.max_abs, float(diff.max()))
        d.outside += int((diff > atol + rtol * np.abs(xb[both])).sum())
    d.outside += int((fa != fb).sum())  # NaN / Inf on one side only
    acc.sum_abs += float(diff.sum())
    acc.sum_sq_diff += float(np.dot(diff, diff))
    acc.sum_sq_a += float(np.dot(xa[both], xa[both]))


def compare_tensor(
    name: str,
    section: str,
    a_ck: Checkpoint,
    a: LazyTensor,
    b_ck: Checkpoint,
    b: LazyTensor,
    atol: float,
    rtol: float,
    _trust_crc: bool = True,
    exact: bool = False,
) -> TensorDiff:
    """Compare two tensors chunk by chunk: bitwise identity, then value statistics for what differs.  Two
    whole-storage tensors whose zip records have the same size and CRC32 are equal by CRC without reading
    them, unless ``exact``."""
    d = TensorDiff(name, section, tuple(a.shape), tuple(b.shape), str(a.dtype), str(b.dtype))
    if tuple(a.shape) != tuple(b.shape):
        d.note = "shape changed"
        return d
    numeric = all(t.dtype in NUMPY or t.dtype == "bfloat16" for t in (a, b))
    same_dtype = a.dtype == b.dtype
    likely_same = _trust_crc and _equal_by_crc(a_ck, a, b_ck, b)
    if likely_same and not exact:
        d.identical, d.note = True, "equal by CRC32"
        return d
    acc, bitwise = _Acc(), same_dtype
    chunks_a = _tensor_chunks(a_ck, a, CHUNK_ELEMENTS * a.dtype.itemsize)
    chunks_b = _tensor_chunks(b_ck, b, CHUNK_ELEMENTS * b.dtype.itemsize)
    for ca, cb in zip(chunks_a, chunks_b):
        if same_dtype and ca == cb:  # confirmed by content
            if numeric and not likely_same:
                acc.sum_sq_a += _sum_sq(ca, a.dtype)
            continue
        bitwise = False
        if likely_same:  # a CRC32 collision: start again with full statistics (practically never)
            return compare_tensor(name, section, a_ck, a, b_ck, b, atol, rtol, _trust_crc=False, exact=exact)
        if numeric:
            _accumulate(d, acc, ca, cb, a.dtype, b.dtype, atol, rtol)
        elif not same_dtype:
            d.outside = a.numel
    d.identical = bitwise
    if not bitwise and numeric:
        d.mean_abs = acc.sum_abs / max(1, a.numel)
        d.rel_l2 = (
            math.sqrt(acc.sum_sq_diff) / math.sqrt(acc.sum_sq_a)
            if acc.sum_sq_a
            else (0.0 if acc.sum_sq_diff == 0 else math.inf)
        )
    if not same_dtype:
        d.note = "dtype changed"
    elif not bitwise and not numeric:
        d.note = "bytes differ"
    return d


def diff_checkpoints(
    a_path: str | os.PathLike,
    b_path: str | os.PathLike,
    atol: float = 0.0,
    rtol: float = 0.0,
    sections: tuple[str, ...] = SECTIONS,
    strip_prefix: bool = True,
    progress=None,
    exact: bool = False,
) -> DiffReport:
    """Compare two checkpoints in any supported containers (read inertly: nothing in them runs).
    Raises ckpttools.errors.MissingPath / NotACheckpoint."""
    a_ck, b_ck = open_checkpoint(Path(a_path)), open_checkpoint(Path(b_path))
    report = DiffReport(str(a_path), str(b_path))
    sec_a, sec_b = sections_of(a_ck), sections_of(b_ck)
    content_layouts = (_content_layout(a_ck), _content_layout(b_ck))  # recognising walks the tree: once each
    layouts = set(content_layouts)
    flat = {x for x in layouts if rules_for(x) is GENERIC}  # not a trainer's training checkpoint
    if flat and len(layouts) > 1:
        # e.g. a training checkpoint against its exported weights: compare the weights each side would export
        # (some trainers keep them under 'ema' with 'model' None; `ckpt convert` takes the same ones)
        for ck, sec, layout in ((a_ck, sec_a, content_layouts[0]), (b_ck, sec_b, content_layouts[1])):
            found = L.weights_of(ck.tree, layout)
            if found and found[1]:
                sec["model"] = found[1]
        report.notes.append(
            "different layouts: comparing the model weights only (the ones an export takes); run "
            "settings and counters are not judged (one side is not a training checkpoint)"
        )
        sections = tuple(s for s in sections if s == "model")
    total_pairs = []
    for section in (s for s in sections if s != "meta"):
        total_pairs += _pair_section(section, sec_a.get(section, {}), sec_b.get(section, {}), strip_prefix, report)
    total_bytes = sum(t.nbytes for _, _, t, _ in total_pairs) or 1
    done = 0
    for section, name, ta, tb in total_pairs:
        if not exact and _equal_by_crc(a_ck, ta, b_ck, tb):  # the usual pair: settled without a TensorDiff
            report.same += 1
            report.equal_by_crc += 1
        else:
            d = compare_tensor(name, section, a_ck, ta, b_ck, tb, atol, rtol, exact=exact)
            if d.identical:
                report.same += 1
                report.equal_by_crc += d.note == "equal by CRC32"
            else:
                report.changed.append(d)
        done += ta.nbytes
        if progress:
            progress(done, total_bytes)
    report.changed.sort(key=_importance)
    if "meta" in sections:
        _diff_metadata(a_ck, b_ck, report, content_layouts)
    # last, and put first: a large pickle's safety scan has run beside the comparison (pickle.background)
    report.notes[:0] = _container_notes(a_ck, "A") + _container_notes(b_ck, "B")
    report.verdict = _verdict(report)
    return report


def _pair_section(section: str, names_a: dict, names_b: dict, strip_prefix: bool, report: DiffReport) -> list:
    """The (section, name, A tensor, B tensor) pairs of one section; names on one side only go to the report."""
    if strip_prefix:
        names_a, pa = _normalise(names_a)
        names_b, pb = _normalise(names_b)
        for prefix, label in ((pa, "A"), (pb, "B")):
            if prefix and prefix != (pb if label == "A" else pa):
                report.notes.append(f"{section}: stripped the {prefix!r} prefix of {label}'s names to match")
    for only, mine, other in ((report.only_in_a, names_a, names_b), (report.only_in_b, names_b, names_a)):
        for name in sorted(mine.keys() - other.keys()):
            only.append(
                {"section": section, "name": name, "shape": list(mine[name].shape), "dtype": str(mine[name].dtype)}
            )
    return [(section, n, names_a[n], names_b[n]) for n in sorted(names_a.keys() & names_b.keys())]


def _container_notes(ck: Checkpoint, label: str) -> list[str]:
    """What a side's container or pickle gives away before its values are compared."""
    notes = []
    errors = [f for f in ck.findings if f.severity == "error"]
    if errors:
        notes.append(f"{label} has container problems ({errors[0].code}); run `ckpt verify {ck.path}`")
    dangerous = list(dict.fromkeys(j.reference for _, j in ck.dangerous()))
    if dangerous:
        notes.append(
            f"{label}'s pickle would run code when loaded with torch.load(weights_only=False) "
            f"({', '.join(dangerous[:3])}); compared here without running it"
        )
    return notes


_ABSENT = object()


def _pop_path(meta: dict, dotted: str):
    """Remove ``a.b.c`` from nested dicts and return its value (``_ABSENT`` when it is not there)."""
    *parents, last = dotted.split(".")
    node = meta
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return node.pop(last, _ABSENT) if isinstance(node, dict) else _ABSENT


def _diff_metadata(a_ck: Checkpoint, b_ck: Checkpoint, report: DiffReport, layouts: tuple[str, str]) -> None:
    from deepdiff import DeepDiff

    meta_a, meta_b = metadata_of(a_ck.tree), metadata_of(b_ck.tree)
    volatile = dict.fromkeys(VOLATILE_META + tuple(f for x in layouts for f in rules_for(x).volatile_metadata))
    for key in volatile:
        a, b = _pop_path(meta_a, key), _pop_path(meta_b, key)
        if a != b:
            report.ignored_metadata.append(key)
    if meta_a == meta_b:  # plain values: a C-speed comparison settles the usual case without DeepDiff
        return
    dd = DeepDiff(meta_a, meta_b, ignore_order=False, verbose_level=2, ignore_nan_inequality=True)
    for kind, entries in dd.items():
        items = entries.items() if isinstance(entries, dict) else ((e, None) for e in entries)
        for path, change in items:
            field_name = _field_path(path)
            if kind == "values_changed" or kind == "type_changes":
                report.metadata.append(
                    {"field": field_name, "a": change.get("old_value"), "b": change.get("new_value")}
                )
            elif kind.endswith("_removed"):
                report.metadata.append({"field": field_name, "a": change, "b": None})
            elif kind.endswith("_added"):
                report.metadata.append({"field": field_name, "a": None, "b": change})


def _importance(d: TensorDiff) -> tuple:
    """Sort key, most important first: a changed shape or dtype, then the largest relative change (NaN/Inf as
    the largest), then the largest absolute one."""

    def largest_first(x: float) -> float:
        return -(x if math.isfinite(x) else math.inf)

    return (d.note == "", largest_first(d.rel_l2), largest_first(d.max_abs))


def _field_path(path: str) -> str:
    """A DeepDiff path as a user writes it: ``root['results'][1]['mAP50']`` -> ``results[1].mAP50``."""
    from deepdiff.path import parse_path

    try:
        parts = parse_path(path)
    except Exception:  # noqa: BLE001 - a path DeepDiff cannot parse back: shown as DeepDiff wrote it
        return str(path).replace("root", "", 1)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += ("." if out else "") + part
        else:
            out += f"[{part!r}]"
    return out


def _verdict(report: DiffReport) -> str:
    if report.only_in_a or report.only_in_b or report.metadata:
        return DIFFERENT
    if not report.changed:
        return IDENTICAL
    if all(not d.note and d.outside == 0 for d in report.changed):
        return WITHIN
    return DIFFERENT


def _content_layout(ck: Checkpoint) -> str:
    """The layout of what a checkpoint holds: a DCP folder is judged by the state dict inside it."""
    return L.content_layout(ck.tree, L.recognise_checkpoint(ck))
