"""Preflight: refuse a resume that would silently change the run.

A trainer describes a run as a flat record of named fields (``data``, ``batch``, ``lr0``, ``fusion``, ...);
``preflight(recorded, requested, allow)`` compares the record stored in the checkpoint with the one the
resume would use, field by field, with one stated rule per field (``RULES``).  Any difference that is not
in ``allow`` blocks the resume.  Fields are named by the trainer option that sets them, so the table and
the ``--allow-change`` flag speak the user's language.

A change of device (cuda -> cpu) is never a difference: devices are not in the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpttools import layouts as L
from ckpttools.errors import UsageError
from ckpttools.formats.registry import open_checkpoint
from ckpttools.trainers.registry import rules_for
from ckpttools.trainers.run_records import records_for, run_record_trainers

# field -> (group, why it matters).  Order is the order of the table.
RULES: dict[str, tuple[str, str]] = {
    "data": ("data", "a different dataset makes the curves incomparable"),
    "fraction": ("data", "the share of the training images used"),
    "batch": ("batch", "the global batch sets the gradient noise and the per-step learning rate"),
    "world-size": ("batch", "a different number of processes splits batches and RNG streams differently"),
    "lr0": ("learning rate", "initial learning rate"),
    "lrf": ("learning rate", "final learning-rate fraction"),
    "momentum": ("learning rate", "SGD momentum / Adam beta1"),
    "weight-decay": ("learning rate", "weight decay"),
    "optimizer": ("learning rate", "the optimizer state would not fit another optimizer"),
    "warmup-epochs": ("learning rate", "warmup length"),
    "schedule": ("learning rate", "decay curve"),
    "epochs": ("learning rate", "the decay schedule spans the planned epochs"),
    "fusion": ("model", "model structure"),
    "scale": ("model", "model width and depth"),
    "nc": ("model", "number of classes"),
    "ch": ("model", "input channels: 6 = RGB + infrared, 3 = RGB only"),
    "img-size": ("model", "input size"),
    "model": ("model", "fingerprint over parameter names and shapes"),
}
ALLOWABLE = tuple(RULES)


@dataclass
class FieldCheck:
    field: str
    recorded: Any
    requested: Any
    status: str  # "same", "changed" (blocks), "allowed", "note" (differs harmlessly, e.g. a moved dataset)
    note: str = ""


@dataclass
class PreflightReport:
    checks: list[FieldCheck] = field(default_factory=list)

    @property
    def blocked(self) -> list[FieldCheck]:
        return [c for c in self.checks if c.status == "changed"]

    @property
    def allowed(self) -> list[FieldCheck]:
        return [c for c in self.checks if c.status == "allowed"]

    @property
    def ok(self) -> bool:
        return not self.blocked

    def allow_hint(self) -> str:
        return "--allow-change " + ",".join(c.field for c in self.blocked)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "blocked": [c.field for c in self.blocked],
            "allowed": [c.field for c in self.allowed],
            "checks": [c.__dict__ for c in self.checks],
            "allow_hint": self.allow_hint() if self.blocked else None,
        }


class UnknownField(UsageError):
    pass


def parse_allow(text: str | None) -> set[str]:
    """'batch,lr0' -> {'batch', 'lr0'}; underscores accepted for dashes; unknown names raise."""
    names = {t.strip().replace("_", "-") for t in (text or "").split(",") if t.strip()}
    names = {"world-size" if n in ("world", "world size", "worldsize") else n for n in names}
    unknown = sorted(names - set(RULES))
    if unknown:
        raise UnknownField(f"--allow-change: unknown field(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
    return names


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def preflight(recorded: dict[str, Any], requested: dict[str, Any], allow: set[str] | None = None) -> PreflightReport:
    """Compare two run records.  ``data`` is special: records carry ``data`` (resolved path) and
    ``data-fingerprint``; a moved but identical dataset is a note, changed content at any path blocks.
    Fields missing from either record are skipped (a trainer records what it has)."""
    allow = allow or set()
    report = PreflightReport()
    for name in RULES:
        if name == "data":
            check = _check_data(recorded, requested)
        elif name in recorded and name in requested:
            a, b = recorded[name], requested[name]
            check = FieldCheck(name, a, b, "same" if _same(a, b) else "changed")
        else:
            continue
        if check.status == "changed" and name in allow:
            check.status = "allowed"
        if check.status in ("changed", "allowed"):
            content_only = name == "data" and check.recorded == check.requested
            consequence = rules_for(recorded.get("trainer")).resume_consequence(name, content_only)
            check.note = "; ".join(x for x in (check.note, consequence) if x)
        elif name == "data" and recorded.get("data-note") and check.status == "same":
            check.note = recorded["data-note"]
        report.checks.append(check)
    return report


def _check_data(recorded: dict, requested: dict) -> FieldCheck:
    path_a, path_b = recorded.get("data"), requested.get("data")
    fp_a, fp_b = recorded.get("data-fingerprint"), requested.get("data-fingerprint")
    if fp_a and fp_b and fp_a != fp_b:
        note = "content changed at the same path" if path_a == path_b else "different dataset"
        return FieldCheck("data", path_a, path_b, "changed", note)
    ir_a = recorded.get("data-infrared")
    if ir_a and requested.get("data-infrared") != ir_a:  # recorded by a trainer that pairs infrared images
        return FieldCheck("data", path_a, path_b, "changed", "infrared images (imagesIR/) changed")
    if path_a != path_b:
        if fp_a and fp_b:  # same content elsewhere
            return FieldCheck("data", path_a, path_b, "note", "moved, identical content (fingerprint matches)")
        return FieldCheck("data", path_a, path_b, "changed", "different path, content not compared")
    return FieldCheck("data", path_a, path_b, "same")


# ---- records from checkpoints and options --------------------------------------------------------------------


def recorded_fields(path: Path) -> dict[str, Any]:
    """The run record a checkpoint carries, read through the safe reader; its trainer says where it lives."""
    ckpt = open_checkpoint(path)
    layout = L.recognise(ckpt.tree, Path(path))
    record = records_for(layout).run_record(ckpt.tree) if isinstance(ckpt.tree, dict) else None
    if record is None:
        raise UsageError(
            f"{path}: a {layout} checkpoint records no run settings to compare (preflight needs a checkpoint of "
            f"{run_record_trainers()})"
        )
    return {"trainer": layout, **record}


def requested_fields(recorded: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The record a resume with ``given`` options (python names: img_size, weight_decay, ...) would have;
    options not given are taken from ``recorded``; the checkpoint's trainer reads ``--data`` its own way."""
    fields = {name.replace("_", "-"): value for name, value in given.items()}
    return records_for(recorded.get("trainer")).requested_record(recorded, fields)
