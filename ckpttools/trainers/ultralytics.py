"""Ultralytics (and YOLOFuse) checkpoints: the run record the preflight can compare, from ``train_args`` and
the label cache Ultralytics wrote for the dataset, and what Ultralytics itself does with a changed value on
``resume=True``."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from ckpttools import layouts as L
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
from ckpttools.report import INFO, Report
from ckpttools.trainers.base import TrainerRules, now

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
    "fraction": "fraction",
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
    "fraction": IGNORED,
}


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


class UltralyticsRules(TrainerRules):
    """Ultralytics 8.x and its forks (YOLOFuse): ``YOLO(last.pt).train(resume=True)`` reads ``train_args``."""

    layout = L.ULTRALYTICS
    title = "Ultralytics"
    run_folders = True
    fields: dict[str, str] = FIELDS  # preflight field -> train_args key

    def check(self, tree: dict, report: Report) -> None:
        if tree.get("epoch") == -1:
            report.add(
                INFO,
                "ultralytics.stripped",
                f"final (stripped) {self.title} checkpoint: no optimizer, epoch -1",
                "epoch",
            )

    def position(self, tree: dict) -> str | None:
        epoch, args = tree.get("epoch"), tree.get("train_args")
        if not isinstance(epoch, int):
            return None
        if epoch == -1:
            return "final: training finished, optimizer stripped"
        total = args.get("epochs") if isinstance(args, dict) else None
        return f"{epoch + 1}{f' of {total}' if total else ''} epochs done"

    def sections(self, tree: Any) -> dict[str, Any] | None:
        if not isinstance(tree, dict):
            return None
        return {"model": tree.get("model"), "ema": tree.get("ema"), "optimizer": tree.get("optimizer")}

    def remap_device(self, tree: dict, gpus: int | None, device: str | None, changes: list[str]) -> None:
        if isinstance(tree.get("train_args"), dict):
            remap_device(tree, gpus, device, changes)

    def remap_processes(self, tree: dict, gpus: int, source, changes: list[str]) -> bool:
        # no per-rank state and no prefixes in an Ultralytics checkpoint: the device string is the change
        return isinstance(tree.get("train_args"), dict)

    def run_record(self, tree: dict) -> dict[str, Any] | None:
        return (
            record_of_checkpoint(tree, self.fields, self.layout) if isinstance(tree.get("train_args"), dict) else None
        )

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

    def resume_consequence(self, field: str, content_only: bool) -> str | None:
        return ON_RESUME.get("data-content" if field == "data" and content_only else field)

    def audit_notes(self) -> list[str]:
        return ["Ultralytics records no resumes in its checkpoints: boundaries come from the epoch column only"]


RULES = UltralyticsRules()


def remap_device(tree: dict, gpus: int | None, device: str | None, changes: list[str]) -> None:
    """Rewrite ``train_args.device``, the value ``YOLO(last.pt).train(resume=True)`` starts its processes from.
    Ultralytics' ``batch`` is the global batch (split over DDP processes), so it stays; ``workers`` is per
    process and is left as it is.  The change is recorded under the checkpoint's ``ckpttools`` key (Ultralytics
    ignores unknown top-level keys, but would refuse unknown ``train_args`` keys on resume)."""
    args = tree["train_args"]
    old = args.get("device")
    if device is not None and device != "cpu" and gpus is None:
        new = device.split(":", 1)[1] if ":" in device else "0"
    elif device == "cpu":
        new = "cpu"
    else:
        new = ",".join(str(i) for i in range(gpus)) if gpus and gpus > 1 else "0"
    if str(old) == new:
        changes.append(f"train_args.device is already {new!r}")
        return
    args["device"] = new
    changes.append(
        f"train_args.device {old!r} -> {new!r} (what Ultralytics resumes on); global batch {args.get('batch')} kept"
    )
    record = tree.setdefault("ckpttools", {})
    if isinstance(record, dict):
        record.setdefault("history", []).append(
            {"event": "remap", "date": now(), "changes": {"train_args.device": [old, new]}}
        )
