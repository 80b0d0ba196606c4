"""fuse-train's checkpoint schema: the format name and version, every top-level key, and the run record the
preflight compares.  The trainer (``fuse_train``) writes checkpoints with these names; ckpttools reads them
with the same names; docs/checkpoint-format.md describes them.  One definition, imported by both."""

from __future__ import annotations

from typing import Any

FORMAT_NAME = "fuse-train-checkpoint"
FORMAT_VERSION = 1

# top-level checkpoint keys (Ultralytics-compatible names where Ultralytics has one)
K_FORMAT, K_VERSION = "format", "format_version"
K_MODEL, K_EMA, K_UPDATES, K_OPTIMIZER = "model", "ema", "updates", "optimizer"
K_SCHEDULER, K_SCALER = "scheduler", "scaler"
K_EPOCH, K_BEST_FITNESS = "epoch", "best_fitness"
K_TRAIN_ARGS, K_RESOLVED, K_MODEL_CONFIG = "train_args", "resolved", "model_config"
K_METRICS, K_RESULTS, K_PROGRESS, K_RNG = "train_metrics", "results", "progress", "rng"
K_HISTORY, K_VERSIONS, K_DATE = "history", "versions", "date"
K_DIGEST = "digest"  # ckpttools.digest.DIGEST_KEY

REQUIRED_KEYS = (
    K_FORMAT,
    K_VERSION,
    K_MODEL,
    K_EMA,
    K_UPDATES,
    K_OPTIMIZER,
    K_EPOCH,
    K_BEST_FITNESS,
    K_TRAIN_ARGS,
    K_PROGRESS,
    K_RNG,
)


def is_fuse_train(tree: Any) -> bool:
    return isinstance(tree, dict) and tree.get(K_FORMAT) == FORMAT_NAME


def run_record(train_args: dict, resolved: dict) -> dict[str, Any]:
    """The flat record of a fuse-train run the preflight compares (field names are the option names)."""
    return {
        "data": resolved.get("data_yaml"),
        "data-fingerprint": resolved.get("dataset_fingerprint"),
        "batch": train_args.get("batch"),
        "world-size": resolved.get("world_size", 1),
        "lr0": train_args.get("lr0"),
        "lrf": train_args.get("lrf"),
        "momentum": train_args.get("momentum"),
        "weight-decay": train_args.get("weight_decay"),
        "optimizer": train_args.get("optimizer"),
        "warmup-epochs": train_args.get("warmup_epochs"),
        "schedule": train_args.get("schedule"),
        "epochs": train_args.get("epochs"),
        "fusion": train_args.get("fusion"),
        "scale": train_args.get("scale"),
        "nc": len(resolved.get("names") or {}),
        "img-size": resolved.get("img_size"),
        "model": resolved.get("model_fingerprint"),
    }


def record_of_checkpoint(tree: dict) -> dict[str, Any]:
    return run_record(_plain(tree.get(K_TRAIN_ARGS)), _plain(tree.get(K_RESOLVED)))


def _plain(value: Any) -> dict:
    return dict(value) if isinstance(value, dict) else {}


def position_of(progress: dict) -> float:
    """Epochs done at a checkpoint's ``progress`` (1.5: half way through the second epoch), as a history event
    records it under ``position``."""
    return int(progress["epoch"]) + int(progress["step_in_epoch"]) / max(1, int(progress["steps_per_epoch"]))
