"""The run record the preflight compares for Ultralytics (and YOLOFuse) checkpoints: the fields of
``train_args`` (``UltralyticsRules.fields``) and the content fingerprint of the data, from the label cache
Ultralytics wrote for the dataset; and the record a resume with other options would have.  Apart from the
rules (``ultralytics.py``) because it reads datasets: see ``run_records.py``."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from ckpttools.datasets.ultralytics_data import (
    UltralyticsData,
    UltralyticsDataError,
    cache_fingerprint,
    cache_path,
    content_fingerprint,
    has_infrared,
    infrared_fingerprint,
    load_ultralytics_yaml,
    read_label_cache,
)
from ckpttools.errors import UsageError
from ckpttools.trainers.base import RunRecords
from ckpttools.trainers.ultralytics import FIELDS, RULES, TRAINER, UltralyticsRules
from ckpttools.trainers.yolofuse import RULES as YOLOFUSE_RULES


def record_of_checkpoint(tree: dict, fields: dict[str, str] = FIELDS, trainer: str = TRAINER) -> dict[str, Any]:
    """The preflight record of an Ultralytics checkpoint: ``fields`` (preflight field -> ``train_args`` key)
    from its run arguments, and its data's content fingerprint(s)."""
    args = tree.get("train_args")
    args = dict(args) if isinstance(args, dict) else {}
    record: dict[str, Any] = {field: args[key] for field, key in fields.items() if key in args}
    record["trainer"] = trainer
    if "model" in record:
        record["model"] = Path(str(record["model"])).name
    data = record.get("data")
    if data:
        try:
            spec = load_ultralytics_yaml(str(data))
        except UltralyticsDataError:
            spec = None
        fingerprint, note = recorded_data_fingerprint(str(data), spec)
        if fingerprint:
            record["data-fingerprint"] = fingerprint
        record["data-note"] = note
        ours = tree.get("ckpttools")  # the integration's record: what the run started on
        started = ours.get("data") if isinstance(ours, dict) else None
        if isinstance(started, dict) and started.get("infrared"):
            record["data-infrared"] = started["infrared"]
        elif spec is not None and has_infrared(spec):
            record["data-note"] = (
                f"{note}; infrared images (imagesIR/, YOLOFuse) not compared: Ultralytics' label cache lists the "
                "RGB images only and this checkpoint records no fingerprint of them (the ckpttools integration "
                "records one)"
            )
    return record


def infrared_fingerprint_of(data: str) -> str | None:
    """The infrared partners' fingerprint of the training split of ``data`` (a data YAML), None without them."""
    return infrared_fingerprint(load_ultralytics_yaml(data))


def recorded_data_fingerprint(data: str, spec: UltralyticsData | None) -> tuple[str | None, str]:
    """The content fingerprint of the data the run started on, from the label cache Ultralytics wrote then,
    and a note saying where it came from (or why there is none).  ``spec``: ``data`` read, None if it cannot be."""
    if spec is None:
        return None, f"{data} is not here: its content cannot be checked"
    cache = cache_path(spec)
    if cache is None or not cache.is_file():
        return None, "no label cache (labels/train.cache): content not checked"
    try:
        value = read_label_cache(cache)
    except UltralyticsDataError as exc:
        return None, f"{exc}: content not checked"
    when = _dt.datetime.fromtimestamp(cache.stat().st_mtime).isoformat(timespec="seconds")
    return cache_fingerprint(value, spec.root), f"content from the label cache Ultralytics wrote ({cache.name}, {when})"


class UltralyticsRecords(RunRecords):
    """The run records of the checkpoints ``rules`` answers for (its preflight ``fields`` and layout name)."""

    def __init__(self, rules: UltralyticsRules):
        self.rules = rules

    def run_record(self, tree: dict) -> dict[str, Any] | None:
        if not isinstance(tree.get("train_args"), dict):
            return None
        return record_of_checkpoint(tree, self.rules.fields, self.rules.layout)

    def requested_record(self, recorded: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """The dataset is fingerprinted now even when ``--data`` is not given: Ultralytics rescans changed
        files at the same path silently."""
        requested = dict(recorded)
        requested.pop("data-fingerprint", None)
        data = given.get("data") or recorded.get("data")
        if data:
            spec = None  # the data YAML read once, for the content and the infrared partners
            try:
                spec = load_ultralytics_yaml(str(data))
                requested["data-fingerprint"] = content_fingerprint(spec)
                if "data" in given:
                    requested["data"] = str(spec.yaml_path)
            except UltralyticsDataError as exc:
                if "data" in given:
                    raise UsageError(f"--data: {exc}") from None
            if recorded.get("data-infrared"):
                requested["data-infrared"] = infrared_fingerprint(spec) if spec is not None else None
        for name, value in given.items():
            if name != "data":
                requested[name] = Path(str(value)).name if name == "model" else value
        return requested


RECORDS = UltralyticsRecords(RULES)
YOLOFUSE_RECORDS = UltralyticsRecords(YOLOFUSE_RULES)
