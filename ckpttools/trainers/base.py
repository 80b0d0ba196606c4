"""The one protocol between the generic commands and what a trainer does with its checkpoints.

A command asks ``rules_for(layout)`` (``trainers/registry.py``) and calls these methods; it never names a
trainer.  This class is also the generic fallback: a checkpoint no trainer module claims gets these answers
(no trainer-specific findings, no run record, the prefix-only remap).  A trainer module subclasses it and
overrides what it knows; docs/architecture.md shows how to add one.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from ckpttools.report import Report
from ckpttools.tensors import TensorSource


class TrainerRules:
    layout: str = "generic"  # the layouts.py name this module answers for
    title: str = "this"  # how messages name the trainer ("a fuse-train checkpoint")
    run_folders: bool = False  # writes a run folder with results.csv that `ckpt audit` reads
    volatile_metadata: tuple[str, ...] = ()  # dotted fields that differ between any two saves: diff lists them

    # ---- verify
    def expects_digest(self, format_name: str) -> bool:
        """Whether a checkpoint in this container should carry ckpttools' content digest."""
        return False

    def check(self, tree: dict, report: Report) -> None:
        """Findings only this trainer's checkpoints can have (counters, stripped finals, ...)."""

    def optimizer_state(self, tree: dict, key: str) -> Any:
        """The optimizer's state dict stored under ``key`` (the layout table's optimizer key)."""
        return tree.get(key)

    def position(self, tree: dict) -> str | None:
        """Where the run stood when this was saved, as people count (epochs from 1), e.g. '2 of 3 epochs done'
        or 'in epoch 3 of 3, step 5 of 20 (saved mid-epoch)'; None where the trainer records no such thing."""
        return None

    # ---- inspect
    def describe(self, tree: dict) -> dict[str, str]:
        """What the trainer's checkpoint says about its model beyond the weights (YOLOFuse: its fusion and input
        channels), as label -> text for ``inspect``; {} when nothing."""
        return {}

    # ---- diff
    def sections(self, tree: Any) -> dict[str, Any] | None:
        """Section name -> the value holding its tensors (``model``, ``ema``, ``optimizer``), or None to let the
        command find the weights by the layout table."""
        return None

    # ---- remap
    def remap_device(self, tree: dict, gpus: int | None, device: str | None, changes: list[str]) -> None:
        """Rewrite what the trainer resumes on (its recorded device string) for ``--gpus`` / ``--device``."""

    def remap_processes(self, tree: dict, gpus: int, source: TensorSource, changes: list[str]) -> bool:
        """Carry per-process state to ``gpus`` processes; False leaves the generic rule (weight-name prefixes)."""
        return False

    def record_event(self, tree: Any, event: str, changes: list[str]) -> None:
        """Note a remap or repair in the checkpoint's own history, where the trainer keeps one."""

    # ---- repair
    def rebuilds_missing_digest(self) -> bool:
        return False

    # ---- preflight (the run records it compares: RunRecords below)
    def resume_consequence(self, field: str, content_only: bool) -> str | None:
        """What the trainer itself does on resume with a changed ``field`` (``content_only``: the data's files
        changed at the same path), to be said next to the preflight's verdict."""
        return None

    # ---- audit
    def audit_notes(self) -> list[str]:
        return []


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def event_position(event: dict, steps_per_epoch: int) -> float:
    """Epochs done when a history event happened: its ``position``, or for events recorded before there was one,
    its step over the steps per epoch (what that meant until a batch size could change)."""
    position = event.get("position")
    return float(position) if isinstance(position, (int, float)) else int(event["step"]) / max(1, steps_per_epoch)


GENERIC = TrainerRules()


class RunRecords:
    """What a trainer's preflight compares: the run settings a checkpoint records, and the record a resume with
    other options would have.  Apart from ``TrainerRules`` because it reads datasets (the fingerprint of the data
    a run trains on): the commands that only read checkpoints never load the dataset readers."""

    def run_record(self, tree: dict) -> dict[str, Any] | None:
        """The settings the run was started with, as preflight fields; None when the checkpoint records none."""
        return None

    def requested_record(self, recorded: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """The record a resume with ``given`` options (preflight field names) would run with."""
        return {**recorded, **given}


NO_RECORDS = RunRecords()
