"""The run records the preflight compares, by layout name: one per trainer whose checkpoints carry one.

Apart from ``registry.py`` (each trainer's rules for reading, checking and changing its checkpoints) because
these read datasets: ``verify``, ``inspect``, ``diff``, ``convert`` and ``remap`` never import the dataset
readers, and start that much sooner.  Adding one = its records module + one line here."""

from __future__ import annotations

from ckpttools.trainers import fuse_train_records, ultralytics_records
from ckpttools.trainers.base import NO_RECORDS, RunRecords
from ckpttools.trainers.fuse_train import RULES as FUSE_TRAIN
from ckpttools.trainers.registry import either, rules_for
from ckpttools.trainers.ultralytics import RULES as ULTRALYTICS
from ckpttools.trainers.yolofuse import RULES as YOLOFUSE

BY_LAYOUT: dict[str, RunRecords] = {
    FUSE_TRAIN.layout: fuse_train_records.RECORDS,
    YOLOFUSE.layout: ultralytics_records.YOLOFUSE_RECORDS,
    ULTRALYTICS.layout: ultralytics_records.RECORDS,
}


def records_for(layout: str | None) -> RunRecords:
    """The run records of a layout name (or a run record's ``trainer``); none for any other."""
    return BY_LAYOUT.get(layout or "", NO_RECORDS)


def run_record_trainers() -> str:
    """'fuse-train, YOLOFuse or Ultralytics': the trainers whose checkpoints carry a run record, for messages."""
    return either([rules_for(layout).title for layout in BY_LAYOUT])
