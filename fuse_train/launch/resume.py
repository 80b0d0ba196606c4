"""Planning a run folder: fresh runs never overwrite, resumes find their checkpoint and pass the preflight."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ckpttools.commands.preflight import PreflightReport, UnknownField, parse_allow, preflight
from ckpttools.datasets.spec import load_data_spec
from ckpttools.datasets.survey import spec_fingerprint
from ckpttools.render import render_preflight
from ckpttools.trainers.fuse_train_schema import position_of
from ckpttools.trainers.fuse_train_schema import run_record as fuse_train_record
from fuse_train.checkpoint.reading import ResumeError, load_checkpoint, trusted_checkpoint  # noqa: F401
from fuse_train.config import ConfigError, ResolvedRun, RunConfig, pick_img_size, resolve_run
from fuse_train.data.demo import resolve_data_yaml
from fuse_train.data.pairs import PairedDataset
from fuse_train.detector.model import ModelConfig, build_model, model_fingerprint
from fuse_train.launch.relaunch import newest_last
from fuse_train.launch.runlock import check_unlocked
from fuse_train.process.distributed import launch_rank
from fuse_train.training import state as S


class RunFinished(ResumeError):
    """The checkpoint's run has done all its epochs (a restart of a finished run has nothing left to do)."""

    relaunch: str | None = None  # what relaunched the run (a torchrun restart, the same job, --auto-resume)


class PreflightBlocked(Exception):
    def __init__(self, report: PreflightReport, checkpoint: Path):
        super().__init__(f"preflight blocked resume from {checkpoint}")
        self.report, self.checkpoint = report, checkpoint

    def render(self, console) -> None:
        render_preflight(self.report, console, title=f"resume from {self.checkpoint} would change the run")
        fields = ", ".join(c.field + (f" ({c.note})" if c.note else "") for c in self.report.blocked)
        console.print(
            f"fuse-train: resume blocked, the run would change: {fields}. Repeat the checkpoint's "
            f"values, or allow it with {self.report.allow_hint()} (the change is recorded in the "
            "checkpoint's history).",
            markup=False,
            highlight=False,
        )


@dataclass
class ResumePlan:
    cfg: RunConfig
    run_dir: Path
    checkpoint: dict
    path: Path
    event: dict


def _has_checkpoints(run_dir: Path) -> bool:
    weights = run_dir / "weights"
    return any(weights.glob("*.pt")) or any(p.is_dir() for p in weights.glob("*.dcp"))


def fresh_run_dir(cfg: RunConfig, console=None) -> Path:
    """<project>/<name>, or name2, name3, ... if that folder already holds checkpoints (never overwritten)."""
    base = Path(cfg.project) / cfg.name
    run_dir, n = base, 1
    while _has_checkpoints(run_dir):
        n += 1
        run_dir = base.with_name(f"{cfg.name}{n}")
    if run_dir != base and console is not None:
        console.print(
            f"{base} holds checkpoints and is left untouched; this fresh run goes to {run_dir} "
            f"(to continue {base}, use: fuse-train --resume {base / 'weights' / 'last.pt'})",
            markup=False,
            highlight=False,
        )
    return run_dir


def find_last(project: str, name: str | None) -> Path:
    """The checkpoint to resume (last.pt, or last.dcp with --save-format dcp): the named run's, else the most
    recently written under the project."""
    runs = [Path(project) / name] if name else list(Path(project).glob("*"))
    candidates = [last for last in map(newest_last, runs) if last is not None]
    if not candidates:
        if name:
            raise ResumeError(
                f"{Path(project) / name / 'weights' / 'last.pt'}: no checkpoint to resume (run {name!r} "
                f"under {project})"
            )
        raise ResumeError(f"{project}: no run with weights/last.pt to resume; pass the checkpoint: --resume PATH")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def run_record(cfg: RunConfig, resolved: ResolvedRun) -> dict:
    """The flat record the preflight compares (field names are the option names)."""
    return fuse_train_record(cfg.to_dict(), resolved.to_dict())


def requested_resolution(cfg: RunConfig, world_size: int, recorded_fingerprint: str | None = None) -> ResolvedRun:
    """What a run with ``cfg`` would resolve to, computed without writing anything; the dataset fingerprint in
    the version of ``recorded_fingerprint`` (a checkpoint written before fingerprints had versions)."""
    spec = load_data_spec(resolve_data_yaml(cfg.data))
    img_size = pick_img_size(cfg, spec)
    for split in ("train", "val"):  # parse labels: errors before anything
        PairedDataset.from_spec(spec, split, img_size)
    with torch.device("meta"):
        model = build_model(ModelConfig(cfg.fusion, cfg.scale, len(spec.names)), img_size)
    return resolve_run(
        cfg, spec, img_size, world_size, model_fingerprint(model), spec_fingerprint(spec, like=recorded_fingerprint)
    )


def prepare_resume(
    resume: str,
    options: dict,
    explicit: set[str],
    allow_text: str,
    console=None,
    world_size: int | None = None,
    check: bool = True,
) -> ResumePlan:
    """Find and read the checkpoint, merge options, run the preflight. Raises PreflightBlocked / ResumeError."""
    try:
        allow = parse_allow(allow_text)
    except UnknownField as exc:
        raise ConfigError(str(exc)) from None
    path = (
        find_last(options["project"], options["name"] if "name" in explicit else None)
        if resume == "auto"
        else Path(resume)
    )
    if not path.exists():
        raise ResumeError(f"{path}: no such checkpoint")
    if path.absolute().parent.name != "weights":
        raise ResumeError(
            f"{path}: not inside a run folder (<run>/weights/{path.name}); the resumed run writes "
            "results.csv and weights/ beside the checkpoint's folder. Put it at <run>/weights/ first"
        )
    if launch_rank() == 0:  # (the other ranks of a torchrun job share rank 0's run folder)
        check_unlocked(path.absolute().parent.parent)  # before reading what another process may be replacing
    if check:
        path = trusted_checkpoint(path, console)
    ckpt = load_checkpoint(path)
    recorded_cfg = RunConfig.from_dict(ckpt[S.K_TRAIN_ARGS])
    merged = dataclasses.replace(recorded_cfg, **{k: v for k, v in options.items() if k in explicit})
    # where the run lives and which device it uses are not part of the run's identity
    merged = dataclasses.replace(merged, project=str(path.parent.parent.parent), name=path.parent.parent.name)
    progress = ckpt[S.K_PROGRESS]
    if progress.get("finished") and merged.epochs <= recorded_cfg.epochs:
        raise RunFinished(
            f"{path}: this run finished all {recorded_cfg.epochs} epochs; nothing to resume. To train "
            f"longer, extend it: fuse-train --resume {path} --epochs N --allow-change epochs (N > "
            f"{recorded_cfg.epochs}), or start a fresh run"
        )
    reached = int(progress["epoch"]) + (1 if int(progress["step_in_epoch"]) else 0)  # epochs begun
    if merged.epochs < reached:
        raise ConfigError(f"--epochs {merged.epochs}: the checkpoint is already in epoch {reached}")
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    recorded_run = ResolvedRun.from_dict(ckpt[S.K_RESOLVED])
    recorded = run_record(recorded_cfg, recorded_run)
    requested = run_record(merged, requested_resolution(merged, world, recorded_run.dataset_fingerprint))
    report = preflight(recorded, requested, allow)
    if not report.ok:
        raise PreflightBlocked(report, path)
    changes = [{"field": c.field, "from": str(c.recorded), "to": str(c.requested)} for c in report.allowed]
    notes = [c for c in report.checks if c.status == "note"]
    if console is not None:
        for c in report.allowed + notes:
            console.print(
                f"preflight: {c.field}: {c.recorded} -> {c.requested} ({c.status}{': ' + c.note if c.note else ''})",
                markup=False,
                highlight=False,
            )
    event = {
        "event": "resume",
        "date": S.now_iso(),
        "step": int(progress["global_step"]),
        # epochs done at the resume (plots place it here; a step count means another thing after a batch change)
        "position": position_of(progress),
        "from": str(path),
        "changes": changes,
    }
    if progress.get("finished"):
        progress["finished"] = False
    return ResumePlan(merged, path.parent.parent, ckpt, path, event)
