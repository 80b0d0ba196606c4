"""Ultralytics (and YOLOFuse) checkpoints: what the commands check and change in them, the preflight fields
they record in ``train_args``, and what Ultralytics itself does with a changed value on ``resume=True``.  The
run record the preflight compares (which reads the dataset's label cache) is ``ultralytics_records.py``."""

from __future__ import annotations

from typing import Any

from ckpttools import layouts as L
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
