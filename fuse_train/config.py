"""The run record: every option of a run, plus what was resolved from them, saved in every checkpoint.

``RunConfig`` holds what the user asked for (the ``fuse-train`` options, with their defaults);
``ResolvedRun`` holds what the trainer derived (absolute data path, classes, dataset fingerprint, world
size, model fingerprint).  Both are plain dataclasses so they round-trip through ``asdict`` into a
checkpoint that ``torch.load(weights_only=True)`` can read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FUSIONS = ("early", "mid", "late", "rgb", "ir")
SCALES = ("n", "s", "m")
OPTIMIZERS = ("SGD", "AdamW")
SCHEDULES = ("cosine", "linear")
SAVE_FORMATS = ("pt", "dcp")


class ConfigError(ValueError):
    """An option value that cannot be used; the message names the option."""


@dataclass
class RunConfig:
    data: str = "demo"
    fusion: str = "mid"
    scale: str = "n"
    epochs: int = 30
    batch: int = 16  # global batch, split over ranks
    img_size: int | None = None  # None: data.yaml's `imgsz`, else 640
    optimizer: str = "AdamW"
    lr0: float = 0.002
    lrf: float = 0.01
    momentum: float = 0.937  # SGD momentum, AdamW beta1
    weight_decay: float = 0.0005
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    grad_clip: float = 10.0
    seed: int = 0
    device: str = ""  # "" picks cuda:0 when present, else cpu
    workers: int = 2
    project: str = "runs/fuse"
    name: str = "exp"
    save_period: int = -1  # also keep weights/epoch{N}.pt every N epochs; -1 = never
    save_every: int = 0  # also save last.pt every N optimizer steps; 0 = only at epoch ends
    amp: bool = True  # mixed precision on CUDA (bf16 where supported); ignored on CPU
    async_save: bool = True  # write checkpoints on a background thread (the snapshot is taken at the step)
    save_format: str = "pt"  # pt: one torch.save file; dcp: torch.distributed.checkpoint folders (dcp.async_save)
    conf: float = 0.001  # evaluation confidence threshold
    plots: bool = True  # results.png after each epoch, PR / F1 curves, confusion matrix and labels.png at the end
    iou: float = 0.7  # evaluation NMS IoU threshold

    def __post_init__(self) -> None:
        def need(cond: bool, option: str, message: str) -> None:
            if not cond:
                raise ConfigError(f"--{option.replace('_', '-')}: {message}")

        need(self.fusion in FUSIONS, "fusion", f"must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        need(self.scale in SCALES, "scale", f"must be one of {', '.join(SCALES)}, got {self.scale!r}")
        need(
            self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
        )
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}")
        need(self.batch >= 1, "batch", f"must be at least 1, got {self.batch}")
        need(
            self.img_size is None or (self.img_size >= 32 and self.img_size % 32 == 0),
            "img_size",
            f"must be a multiple of 32 (the largest stride), got {self.img_size}",
        )
        need(self.lr0 > 0, "lr0", f"must be positive, got {self.lr0}")
        need(0 < self.lrf <= 1, "lrf", f"must be in (0, 1], got {self.lrf}")
        need(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        need(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        need(
            self.save_format in SAVE_FORMATS,
            "save_format",
            f"must be one of {', '.join(SAVE_FORMATS)}, got {self.save_format!r}",
        )
        need(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class ResolvedRun:
    """What the trainer derived from a RunConfig; recorded so preflight can compare runs."""

    data_yaml: str = ""  # absolute path of the data.yaml used
    data_root: str = ""  # absolute dataset root
    dataset_fingerprint: str = ""
    names: dict[int, str] = field(default_factory=dict)
    img_size: int = 640
    world_size: int = 1
    per_rank_batch: int = 0
    device: str = "cpu"
    model_fingerprint: str = ""
    steps_per_epoch: int = 0

    @property
    def nc(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ResolvedRun:
        known = {f.name for f in dataclasses.fields(cls)}
        out = cls(**{k: v for k, v in values.items() if k in known})
        out.names = {int(k): v for k, v in out.names.items()}
        return out


def pick_img_size(cfg: RunConfig, spec) -> int:
    """The input size: --img-size, else data.yaml's imgsz (held to the same rule as the option), else 640."""
    if cfg.img_size:
        return cfg.img_size
    if spec.imgsz:
        if spec.imgsz < 32 or spec.imgsz % 32:
            raise ConfigError(
                f"{spec.yaml_path}: imgsz {spec.imgsz} must be a multiple of 32 (the largest stride); "
                "fix it there or pass --img-size"
            )
        return spec.imgsz
    return 640


def resolve_run(
    cfg: RunConfig,
    spec,
    img_size: int,
    world_size: int,
    model_fingerprint: str,
    dataset_fingerprint: str,
    device: str = "cpu",
) -> ResolvedRun:
    """The one place a ResolvedRun is built, for a run that starts and for the resume preflight alike.
    ``spec`` is the run's ``ckpttools.datasets.spec.DataSpec``."""
    return ResolvedRun(
        data_yaml=str(spec.yaml_path),
        data_root=str(spec.root),
        dataset_fingerprint=dataset_fingerprint,
        names=dict(spec.names),
        img_size=img_size,
        world_size=world_size,
        per_rank_batch=cfg.batch // max(1, world_size),
        device=device,
        model_fingerprint=model_fingerprint,
    )
