"""Every trainer ckpttools knows, by layout name.  Adding one = its module + one line here (and, if its
checkpoints carry a run record the preflight compares, its records module + one line in ``run_records.py``)."""

from __future__ import annotations

from ckpttools.trainers import fuse_train, lightning, ultralytics, yolofuse
from ckpttools.trainers.base import GENERIC, TrainerRules

TRAINERS: tuple[TrainerRules, ...] = (fuse_train.RULES, yolofuse.RULES, ultralytics.RULES, lightning.RULES)
BY_LAYOUT = {rules.layout: rules for rules in TRAINERS}


def rules_for(layout: str | None) -> TrainerRules:
    """The rules for a layout name (or a run record's ``trainer``); the generic ones for any other."""
    return BY_LAYOUT.get(layout or "", GENERIC)


def run_folder_trainers() -> str:
    """'fuse-train, YOLOFuse or Ultralytics': the trainers whose run folders `ckpt audit` reads, for messages."""
    return either([r.title for r in TRAINERS if r.run_folders])


def either(titles: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return " or ".join(filter(None, [", ".join(titles[:-1]), titles[-1]])) if titles else "none"
