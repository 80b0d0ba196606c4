"""Planning a run folder: fresh runs never overwrite, resumes find their checkpoint and pass the preflight."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ckpttools.atomic import previous_path
from ckpttools.commands.preflight import PreflightReport, UnknownField, parse_allow, preflight
from ckpttools.commands.verify import verify as verify_checkpoint
from ckpttools.errors import CkptError
from ckpttools.render import render_preflight
from ckpttools.trainers.fuse_train_schema import run_record as fuse_train_record
from fuse_train import state as S
from fuse_train.config import ConfigError, ResolvedRun, RunConfig, pick_img_size, resolve_run
from fuse_train.data import PairedDataset, load_data_spec, spec_fingerprint
from fuse_train.dcp_save import load_folder
from fuse_train.model import ModelConfig, build_model, model_fingerprint
from fuse_train.relaunch import newest_last


class ResumeError(ValueError):
    """A resume that cannot start (no checkpoint, unreadable file, finished run); the message says what to do."""


class RunFinished(ResumeError):
    """The checkpoint's run has done all its epochs (a restart of a finished run has nothing left to do)."""


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


def load_checkpoint(path: Path) -> dict:
    """Read a fuse-train checkpoint safely (weights_only; a DCP folder is judged by ckpttools' inert reader first);
    the previous good copy is named when this fails."""
    try:
        ckpt = load_folder(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
    except CkptError as exc:  # a DCP folder that is damaged or would run code
        raise ResumeError(str(exc)) from None
    except FileNotFoundError:
        raise ResumeError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one message
        prev = previous_path(path)
        hint = f"; the previous good checkpoint is {prev} (check it with: ckpt verify {prev})" if prev.exists() else ""
        raise ResumeError(f"{path}: cannot read checkpoint ({str(exc).splitlines()[0]}){hint}") from None
    if not isinstance(ckpt, dict) or ckpt.get(S.K_FORMAT) != S.FORMAT_NAME:
        raise ResumeError(f"{path}: not a fuse-train checkpoint (no format: {S.FORMAT_NAME})")
    if ckpt.get(S.K_VERSION, 0) > S.FORMAT_VERSION:
        raise ResumeError(
            f"{path}: checkpoint format version {ckpt[S.K_VERSION]} is newer than this fuse-train "
            f"understands ({S.FORMAT_VERSION}); upgrade fuse-train"
        )
    return ckpt


def run_record(cfg: RunConfig, resolved: ResolvedRun) -> dict:
    """The flat record the preflight compares (field names are the option names)."""
    return fuse_train_record(cfg.to_dict(), resolved.to_dict())


def requested_resolution(cfg: RunConfig, world_size: int) -> ResolvedRun:
    """What a run with ``cfg`` would resolve to, computed without writing anything."""
    from fuse_train.trainer import resolve_data_yaml

    spec = load_data_spec(resolve_data_yaml(cfg.data))
    img_size = pick_img_size(cfg, spec)
    for split in ("train", "val"):  # parse labels: errors before anything
        PairedDataset.from_spec(spec, split, img_size)
    with torch.device("meta"):
        model = build_model(ModelConfig(cfg.fusion, cfg.scale, len(spec.names)), img_size)
    return resolve_run(cfg, spec, img_size, world_size, model_fingerprint(model), spec_fingerprint(spec))


def trusted_checkpoint(path: Path, console=None) -> Path:
    """``path`` if it passes `ckpt verify` (every CRC32, the digest, structure); else its ``last.prev.pt`` if
    that one does, said in one line; else a ResumeError that names `ckpt repair`."""
    problem = _integrity_problem(path)
    if problem is None:
        return path
    prev = previous_path(path)
    if prev.exists() and _integrity_problem(prev) is None:
        if console is not None:
            console.print(
                f"{path} is damaged ({problem}); resuming from the previous good checkpoint {prev}",
                markup=False,
                highlight=False,
            )
        return prev
    fallback = (
        f"the previous checkpoint {prev} is damaged too"
        if prev.exists()
        else f"there is no previous checkpoint ({prev.name})"
    )
    if path.is_dir():  # a DCP folder: `ckpt repair` reads single files, and a damaged folder is never loaded
        raise ResumeError(
            f"{path}: damaged ({problem}); {fallback}. Resume from an earlier checkpoint of the run "
            "(epoch{N}.dcp, best.dcp): --resume PATH"
        )
    raise ResumeError(
        f"{path}: damaged ({problem}); {fallback}. Salvage it with `ckpt repair {path} -o FIXED.pt` "
        "and resume from FIXED.pt, or pass --no-verify to resume from it anyway"
    )


def _integrity_problem(path: Path) -> str | None:
    try:
        errors = verify_checkpoint(path).errors
    except CkptError as exc:
        return str(exc)
    return f"{errors[0].code}: {errors[0].message}" if errors else None


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
    import os

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
    recorded = run_record(recorded_cfg, ResolvedRun.from_dict(ckpt[S.K_RESOLVED]))
    requested = run_record(merged, requested_resolution(merged, world))
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
        "position": int(progress["epoch"]) + int(progress["step_in_epoch"]) / max(1, int(progress["steps_per_epoch"])),
        "from": str(path),
        "changes": changes,
    }
    if progress.get("finished"):
        progress["finished"] = False
    return ResumePlan(merged, path.parent.parent, ckpt, path, event)
