"""Ultralytics (and YOLOFuse) checkpoints: the run record the preflight can compare, from ``train_args`` and
the label cache Ultralytics wrote for the dataset, and what Ultralytics itself does with a changed value on
``resume=True``."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from ckpttools.datasets.ultralytics_data import (
    UltralyticsDataError,
    cache_fingerprint,
    cache_path,
    content_fingerprint,
    load_ultralytics_yaml,
    read_label_cache,
)

# preflight field -> Ultralytics train_args key
FIELDS = {
    "data": "data",
    "batch": "batch",
    "lr0": "lr0",
    "lrf": "lrf",
    "momentum": "momentum",
    "weight-decay": "weight_decay",
    "optimizer": "optimizer",
    "warmup-epochs": "warmup_epochs",
    "epochs": "epochs",
    "img-size": "imgsz",
    "model": "model",
}
TRAINER = "ultralytics"

# What `YOLO("last.pt").train(resume=True, <option>=new)` does with a new value, from Ultralytics 8.4's
# BaseTrainer.check_resume (its allow-list of overrides; `data` replaces the checkpoint's since 8.4).
APPLIED = "Ultralytics applies the new value on resume"
IGNORED = "Ultralytics ignores it on resume and keeps the checkpoint's value (a warning only)"
ON_RESUME = {
    "data": "Ultralytics trains on the new data on resume (8.4; earlier 8.x kept the checkpoint's path)",
    "data-content": "Ultralytics rescans the changed files and trains on them without a word",
    "batch": APPLIED,
    "img-size": APPLIED,
    "lr0": IGNORED,
    "lrf": IGNORED,
    "momentum": IGNORED,
    "weight-decay": IGNORED,
    "optimizer": IGNORED,
    "warmup-epochs": IGNORED,
    "epochs": IGNORED + "; a finished run cannot be extended this way",
    "model": "Ultralytics ignores it on resume: the checkpoint's model is rebuilt",
}


def record_of_checkpoint(tree: dict) -> dict[str, Any]:
    args = tree.get("train_args")
    args = dict(args) if isinstance(args, dict) else {}
    record: dict[str, Any] = {field: args[key] for field, key in FIELDS.items() if key in args}
    record["trainer"] = TRAINER
    if "model" in record:
        record["model"] = Path(str(record["model"])).name
    data = record.get("data")
    if data:
        fingerprint, note = recorded_data_fingerprint(str(data))
        if fingerprint:
            record["data-fingerprint"] = fingerprint
        record["data-note"] = note
    return record


def recorded_data_fingerprint(data: str) -> tuple[str | None, str]:
    """The content fingerprint of the data the run started on, from the label cache Ultralytics wrote then,
    and a note saying where it came from (or why there is none)."""
    try:
        spec = load_ultralytics_yaml(data)
    except UltralyticsDataError:
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


def requested_data(value: str) -> tuple[str, str]:
    """(yaml path, content fingerprint of its train split now) for ``--data``; raises UltralyticsDataError."""
    spec = load_ultralytics_yaml(value)
    return str(spec.yaml_path), content_fingerprint(spec)
