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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpttools import layouts as L
from ckpttools.commands._tensor_compare import TensorDiff, compare_tensor, equal_by_crc
from ckpttools.formats.registry import Checkpoint, open_checkpoint
from ckpttools.objects import Placeholder
from ckpttools.tensors import LazyTensor, RebuiltTensor, module_tensors
from ckpttools.trainers.base import GENERIC
from ckpttools.trainers.registry import rules_for
from ckpttools.trees import expand_rebuilt, iter_nodes, iter_tensors
from ckpttools.weights import flat_tensors, weights_of

IDENTICAL, WITHIN, DIFFERENT = "identical", "within_tolerance", "different"
SECTIONS = ("model", "ema", "optimizer", "meta")
# differ between any two saves; listed, not judged (a trainer adds its own: TrainerRules.volatile_metadata)
VOLATILE_META = ("date", "history", "digest", "versions")


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
                out[section] = flat_tensors(value) if isinstance(value, dict) else module_tensors(value)
    else:
        found = weights_of(tree, layout)
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
            found = weights_of(ck.tree, layout)
            if found and found[1]:
                sec["model"] = found[1]
        report.notes.append(
            "different layouts: comparing the model weights only (the ones an export takes); run "
            "settings and counters are not judged (one side is not a training checkpoint)"
        )
        sections = tuple(s for s in sections if s == "model")
    paired = [  # (section, its names on each side, the names both have, sorted): pairs are made as they are compared
        (section, *_pair_section(section, sec_a.get(section, {}), sec_b.get(section, {}), strip_prefix, report))
        for section in sections
        if section != "meta"
    ]
    total_bytes = sum(names_a[n].nbytes for _, names_a, _, common in paired for n in common) or 1
    done = 0
    pairs = ((section, n, names_a[n], names_b[n]) for section, names_a, names_b, common in paired for n in common)
    for section, name, ta, tb in pairs:
        if not exact and equal_by_crc(a_ck, ta, b_ck, tb):  # the usual pair: settled without a TensorDiff
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


def _pair_section(section: str, names_a: dict, names_b: dict, strip_prefix: bool, report: DiffReport) -> tuple:
    """The section's tensors by name on each side (prefixes stripped) and the names both have, sorted; names on
    one side only go to the report."""
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
    return names_a, names_b, sorted(names_a.keys() & names_b.keys())


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
    meta_a, meta_b = metadata_of(a_ck.tree), metadata_of(b_ck.tree)
    volatile = dict.fromkeys(VOLATILE_META + tuple(f for x in layouts for f in rules_for(x).volatile_metadata))
    for key in volatile:
        a, b = _pop_path(meta_a, key), _pop_path(meta_b, key)
        if a != b:
            report.ignored_metadata.append(key)
    if meta_a == meta_b:  # plain values: a C-speed comparison settles the usual case without DeepDiff
        return
    from deepdiff import DeepDiff  # only when something differs: importing it takes 0.16 s and 37 MB

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
