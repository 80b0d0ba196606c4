"""Ultralytics (and YOLOFuse) checkpoints: the run record the preflight can compare, from ``train_args``."""

from __future__ import annotations

from typing import Any

# preflight field -> Ultralytics train_args key
FIELDS = {"data": "data", "batch": "batch", "lr0": "lr0", "lrf": "lrf", "momentum": "momentum",
          "weight-decay": "weight_decay", "optimizer": "optimizer", "warmup-epochs": "warmup_epochs",
          "epochs": "epochs", "img-size": "imgsz"}


def record_of_checkpoint(tree: dict) -> dict[str, Any]:
    args = tree.get("train_args")
    args = dict(args) if isinstance(args, dict) else {}
    return {field: args[key] for field, key in FIELDS.items() if key in args}
