"""Run records for the preflight, read from checkpoints through the safe reader.

fuse-train records everything; Ultralytics' ``train_args`` gives data, batch, learning-rate settings,
epochs and image size; other layouts record nothing comparable and are refused with a clear message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpttools import layouts as L
from ckpttools.reader import NotACheckpoint, open_checkpoint
from ckpttools.yolo_data import DatasetError, load_data_spec, spec_fingerprint


class NoRunRecord(ValueError):
    pass


def fuse_train_record(train_args: dict, resolved: dict) -> dict[str, Any]:
    """The flat record of a fuse-train run (field names are the option names)."""
    return {"data": resolved.get("data_yaml"), "data-fingerprint": resolved.get("dataset_fingerprint"),
            "batch": train_args.get("batch"), "world-size": resolved.get("world_size", 1),
            "lr0": train_args.get("lr0"), "lrf": train_args.get("lrf"), "momentum": train_args.get("momentum"),
            "weight-decay": train_args.get("weight_decay"), "optimizer": train_args.get("optimizer"),
            "warmup-epochs": train_args.get("warmup_epochs"), "schedule": train_args.get("schedule"),
            "epochs": train_args.get("epochs"), "fusion": train_args.get("fusion"), "scale": train_args.get("scale"),
            "nc": len(resolved.get("names") or {}), "img-size": resolved.get("img_size"),
            "model": resolved.get("model_fingerprint")}


def ultralytics_record(train_args: dict) -> dict[str, Any]:
    keys = {"data": "data", "batch": "batch", "lr0": "lr0", "lrf": "lrf", "momentum": "momentum",
            "weight-decay": "weight_decay", "optimizer": "optimizer", "warmup-epochs": "warmup_epochs",
            "epochs": "epochs", "img-size": "imgsz"}
    return {field: train_args[key] for field, key in keys.items() if key in train_args}


def recorded_fields(path: Path) -> dict[str, Any]:
    try:
        ckpt = open_checkpoint(path)
    except NotACheckpoint as exc:
        raise NoRunRecord(f"{path}: not a checkpoint: {exc}") from None
    tree = ckpt.tree
    layout = L.recognise(tree, Path(path))
    if layout == L.FUSE_TRAIN:
        return fuse_train_record(_plain(tree.get("train_args")), _plain(tree.get("resolved")))
    if layout == L.ULTRALYTICS and isinstance(tree.get("train_args"), dict):
        return ultralytics_record(_plain(tree["train_args"]))
    raise NoRunRecord(f"{path}: a {layout} checkpoint records no run settings to compare (preflight needs a "
                      "fuse-train or Ultralytics checkpoint)")


def requested_fields(recorded: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The record a resume with ``given`` options (python names: img_size, weight_decay, ...) would have;
    options not given are taken from ``recorded``."""
    requested = dict(recorded)
    for name, value in given.items():
        field = name.replace("_", "-")
        if field == "data":
            try:
                spec = load_data_spec(value)
                requested["data"], requested["data-fingerprint"] = str(spec.yaml_path), spec_fingerprint(spec)
            except DatasetError as exc:
                raise NoRunRecord(f"--data: {exc}") from None
        else:
            requested[field] = value
    if {"fusion", "scale", "img-size"} & {n.replace("_", "-") for n in given}:
        requested.pop("model", None)  # the structure fingerprint is compared by fuse-train itself
    return requested


def _plain(value: Any) -> dict:
    return dict(value) if isinstance(value, dict) else {}
