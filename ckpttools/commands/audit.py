"""``ckpt audit RUN_DIR_OR_CKPT``: the lineage of a run and a verdict on every resume.

Reads the run folder's ``results.csv``, the checkpoint's ``history`` (where the trainer keeps one: resumes,
allowed changes, remaps, repairs, with steps and dates) and, where TensorBoard is installed, the event
files.  For every resume boundary it asks:

* **counters**: do the epoch numbers go on by one (no gap, no repeat, no restart)?
* **learning rate**: does it continue its schedule?  Compared in log space with the run's own epoch-to-epoch
  changes (an allowed ``lr0`` change recorded in the history is reported as allowed, not broken);
* **loss**: does it jump up beyond what the run's own variation explains?

The statistic (also in docs/audit.md): with ``d`` the first differences of a series and ``m``, ``s`` the median
and the scaled median absolute deviation (1.4826 x MAD) of the differences *away from* the boundary, the
boundary difference ``d_b`` is a jump when ``d_b - m > max(6 s, 2 max |d_j - m|)``: larger than six robust
standard deviations *and* than twice any other change of the run.  Loss jumps count upwards only; the learning
rate is judged on ``log(lr)`` in both directions.  Fewer than three other differences: not judged.

Also flagged anywhere in the log: repeated or missing epochs, and TensorBoard steps written twice.  A run
folder whose checkpoints record no resumes (``results.csv`` + ``weights/last.pt``) is read too: boundaries are
where the epoch column breaks.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from ckpttools import layouts as L
from ckpttools.atomic import atomic_write
from ckpttools.errors import MissingPath, UsageError
from ckpttools.formats.registry import open_checkpoint
from ckpttools.report import counted
from ckpttools.trainers.base import event_position
from ckpttools.trainers.registry import rules_for, run_folder_trainers

SEAMLESS, BROKEN, ALLOWED, UNJUDGED = "seamless", "broken", "allowed", "not judged"


@dataclass
class Boundary:
    index: int  # the first results row after the boundary
    epoch: Any  # that row's epoch number
    source: str  # "resume at step N, <date>" or "epoch column breaks"
    step: int | None = None  # the resume's global step, when the history records it
    allowed: list[str] = field(default_factory=list)  # fields the resume was allowed to change (history)
    checks: dict[str, str] = field(default_factory=dict)  # counters / lr / <loss column> -> verdict text
    verdict: str = SEAMLESS

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class AuditReport:
    run_dir: str
    layout: str = "unknown"
    epochs: int = 0
    lineage: list[dict] = field(default_factory=list)
    boundaries: list[Boundary] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # anywhere in the log: repeated / missing epochs, steps twice
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(b.verdict != BROKEN for b in self.boundaries)

    def to_dict(self) -> dict:
        return {
            "run_dir": self.run_dir,
            "ok": self.ok,
            "layout": self.layout,
            "epochs": self.epochs,
            "lineage": self.lineage,
            "boundaries": [b.to_dict() for b in self.boundaries],
            "problems": self.problems,
            "notes": self.notes,
        }


def run_folder(path: Path) -> tuple[Path, Path | None]:
    """(run folder, checkpoint) for a run folder or a checkpoint inside ``<run>/weights/``."""
    if not path.exists():
        raise MissingPath(path)
    if path.is_dir() and not (path / ".metadata").is_file():  # a run folder (a DCP folder is a checkpoint)
        found = [c for c in (path / "weights" / "last.pt", path / "weights" / "last.dcp") if c.exists()]
        return path, max(found, key=lambda c: c.stat().st_mtime) if found else None  # a run saved as DCP folders
    run = path.parent.parent if path.parent.name == "weights" else path.parent
    return run, path


def read_results(path: Path) -> list[dict[str, float]]:
    """results.csv rows as numbers (column names may be padded with spaces)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out = {}
            for key, value in row.items():
                try:
                    out[key.strip()] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(out)
    return rows


def is_jump(
    diffs: list[float], b: int, upward_only: bool, boundaries: set[int] = frozenset()
) -> tuple[bool | None, str]:
    """Whether ``diffs[b]`` is a jump by the statistic in the module docstring; None when there is too little
    else to compare with.  The run's own variation is measured away from every boundary (``boundaries``)."""
    others = [d for j, d in enumerate(diffs) if j != b and j not in boundaries and math.isfinite(d)]
    if len(others) < 3 or not math.isfinite(diffs[b]):
        return None, "too few epochs to judge"
    m = median(others)
    s = 1.4826 * median(abs(d - m) for d in others)
    spread = max(abs(d - m) for d in others)
    excess = diffs[b] - m if upward_only else abs(diffs[b] - m)
    limit = max(6 * s, 2 * spread)
    return excess > limit, f"change {diffs[b]:+.4g} against the run's usual {m:+.4g} (limit {limit:.3g})"


def audit(path: str | os.PathLike) -> AuditReport:
    run, ckpt_path = run_folder(Path(path))
    results = run / "results.csv"
    if not results.is_file():
        given = Path(path)
        where = f"{given}: no results.csv" + (f" in {run}" if given != run else "")
        raise UsageError(f"{where}: not a run folder or a checkpoint in one ({run_folder_trainers()})")
    rows = read_results(results)
    report = AuditReport(str(run), epochs=len(rows))
    history, steps_per_epoch = _history(ckpt_path, report)
    report.problems.extend(_epoch_problems(rows))
    cuts = _boundaries(rows, history, steps_per_epoch, report)
    rows_at = {b.index - 1 for b in cuts}  # the differences that straddle a boundary
    for boundary in cuts:
        _judge(boundary, rows, report, rows_at)
    report.boundaries = cuts
    steps = _step_series(run, report)
    resume_steps = {b.step for b in cuts if b.step is not None}
    for boundary in cuts:
        _judge_steps(boundary, steps, report, resume_steps)
    report.problems.extend(_repeated_steps(steps))
    if not cuts:
        report.notes.append("no resume recorded or visible: one uninterrupted run")
    return report


def _history(ckpt_path: Path | None, report: AuditReport) -> tuple[list[dict], int]:
    if ckpt_path is None:
        report.notes.append("no weights/last.pt: boundaries come from the epoch column only")
        return [], 0
    ckpt = open_checkpoint(ckpt_path)
    tree = ckpt.tree if isinstance(ckpt.tree, dict) else {}
    report.layout = L.recognise(tree, ckpt_path)
    history = [dict(h) for h in tree.get("history") or [] if isinstance(h, dict)]
    progress = tree.get("progress") if isinstance(tree.get("progress"), dict) else {}
    for event in history:
        report.lineage.append({k: event.get(k) for k in ("event", "date", "step", "changes", "from") if k in event})
    versions = tree.get("versions")
    if isinstance(versions, dict):
        report.notes.append("saved by " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    report.notes.extend(rules_for(report.layout).audit_notes())
    return history, int(progress.get("steps_per_epoch") or 0)


def _epoch_problems(rows: list[dict]) -> list[str]:
    epochs = [r.get("epoch") for r in rows]
    out = []
    for i in range(1, len(epochs)):
        a, b = epochs[i - 1], epochs[i]
        if a is None or b is None:
            continue
        if b == a:
            out.append(f"epoch {b:g} appears twice in results.csv (rows {i} and {i + 1})")
        elif b < a:
            out.append(f"epoch numbers restart at row {i + 1}: {a:g} then {b:g} (a resume that began again)")
        elif b > a + 1:
            out.append(f"epochs {a + 1:g} to {b - 1:g} are missing from results.csv")
    return out


def _boundaries(rows: list[dict], history: list[dict], spe: int, report: AuditReport) -> list[Boundary]:
    cuts: list[Boundary] = []
    for event in history:
        if event.get("event") != "resume" or event.get("step") is None or not spe:
            continue
        done = event_position(event, spe)  # epochs completed when it resumed
        index = next((i for i, r in enumerate(rows) if r.get("epoch", 0) > done), None)
        if index is None:
            continue
        allowed = [str(c.get("field")) for c in event.get("changes") or [] if isinstance(c, dict)]
        cuts.append(
            Boundary(
                index,
                rows[index].get("epoch"),
                f"resume at step {event['step']}, {event.get('date', '?')}",
                int(event["step"]),
                allowed,
            )
        )
    epochs = [r.get("epoch") for r in rows]
    recorded = {b.index for b in cuts}
    for i in range(1, len(epochs)):
        if epochs[i] is not None and epochs[i - 1] is not None and epochs[i] != epochs[i - 1] + 1 and i not in recorded:
            cuts.append(Boundary(i, epochs[i], "epoch column breaks"))
    return sorted(cuts, key=lambda b: b.index)


# any allowed change may move the losses (other data or input size, batch noise, another learning rate): a loss
# jump at such a boundary is reported as allowed; the learning rate may move only for its own settings or epochs
LOSS_MAY_CHANGE = frozenset(
    {"data", "img-size", "batch", "world-size", "fusion", "scale", "nc", "model", "lr0", "lrf", "momentum"}
    | {"weight-decay", "optimizer", "warmup-epochs", "schedule", "epochs"}
)


def _judge(boundary: Boundary, rows: list[dict], report: AuditReport, straddling: set[int]) -> None:
    i = boundary.index
    if i == 0:
        boundary.checks["counters"] = "resumed within the first epoch: no earlier row to compare"
        boundary.verdict = UNJUDGED
        return
    a, b = rows[i - 1].get("epoch"), rows[i].get("epoch")
    broken = []
    if a is not None and b is not None and b != a + 1:
        boundary.checks["counters"] = f"epoch {a:g} is followed by {b:g}"
        broken.append("counters")
    else:
        boundary.checks["counters"] = "continue by one"
    allowed = set(boundary.allowed)
    lr_key = "lr" if "lr" in rows[0] else "lr/pg0" if "lr/pg0" in rows[0] else None
    if lr_key:
        series = [math.log(r[lr_key]) if r.get(lr_key, 0) > 0 else float("nan") for r in rows]
        diffs = [y - x for x, y in zip(series, series[1:])]
        jump, why = is_jump(diffs, i - 1, upward_only=False, boundaries=straddling)
        if jump and allowed & {"lr0", "lrf", "schedule", "warmup-epochs", "epochs", "optimizer"}:
            boundary.checks["lr"] = f"changed, allowed ({', '.join(sorted(allowed))}): {why}"
        elif jump:
            boundary.checks["lr"] = f"does not continue its schedule: {why}"
            broken.append("lr")
        else:
            boundary.checks["lr"] = "continues" if jump is False else why
    for key in [k for k in rows[0] if "loss" in k]:
        series = [r.get(key, float("nan")) for r in rows]
        diffs = [y - x for x, y in zip(series, series[1:])]
        jump, why = is_jump(diffs, i - 1, upward_only=True, boundaries=straddling)
        if jump and allowed & LOSS_MAY_CHANGE:
            boundary.checks[key] = f"changed, allowed ({', '.join(sorted(allowed))}): {why}"
        else:
            boundary.checks[key] = f"jumps up: {why}" if jump else "continues" if jump is False else why
        if jump and not allowed & LOSS_MAY_CHANGE:
            broken.append(key)
    if broken:
        boundary.verdict = BROKEN
        report.notes.append(f"epoch {b:g}: {', '.join(broken)} broken at the boundary ({boundary.source})")
    elif allowed:
        boundary.verdict = ALLOWED


def _step_series(run: Path, report: AuditReport) -> dict[str, list[tuple[int, float]]]:
    """Per-step scalars from the run's TensorBoard events (as TensorBoard shows them, purges applied)."""
    if not list(run.glob("events.out.tfevents.*")):
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        report.notes.append("TensorBoard is not installed: event files not checked")
        return {}
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    with _PurgesCounted() as purges:
        ea.Reload()
    report.notes.append(f"TensorBoard events checked: {len(ea.Tags()['scalars'])} scalar tags")
    if purges.count:
        resumes = counted(purges.count, "resume")
        report.notes.append(
            f"TensorBoard drops the steps a stopped run logged past its checkpoint ({resumes}); "
            "the curves are read as it shows them"
        )
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


class _PurgesCounted(logging.Handler):
    """While TensorBoard's reader runs: its notices of purged events are counted here instead of printed.  A
    resume's purge is how the curves continue (the trainer writes the purge step), but TensorBoard words it as
    a warning about "a TensorFlow restart" on the user's terminal."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.logger = logging.getLogger("tensorboard")

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "Purging" in record.getMessage()

    def __enter__(self) -> _PurgesCounted:
        self.saved = (self.logger.propagate, self.logger.level)
        self.logger.addHandler(self)
        self.logger.propagate = False  # not to the root logger (nor Python's last-resort stderr handler)
        self.logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.propagate, level = self.saved
        self.logger.setLevel(level)


def _repeated_steps(series: dict[str, list[tuple[int, float]]]) -> list[str]:
    out = []
    for tag, points in series.items():
        steps = [s for s, _ in points]
        repeated = sorted({s for s in steps if steps.count(s) > 1})
        if repeated:
            out.append(f"TensorBoard {tag}: step(s) {repeated[:5]} written twice (a resume that did not purge)")
    return out


def _judge_steps(boundary: Boundary, series: dict, report: AuditReport, resume_steps: set[int]) -> None:
    """The same statistic on the per-step curves at the resume step: many more points than results.csv."""
    if boundary.step is None:
        return
    step, allowed = boundary.step, boundary.allowed
    broken = []
    for tag, points in sorted(series.items()):
        if not (tag.startswith("train/") or tag == "lr/pg0"):
            continue
        values = dict(points)
        ordered = sorted(values)
        if step not in values or step + 1 not in values:
            continue
        xs = [math.log(values[s]) if tag.startswith("lr/") and values[s] > 0 else values[s] for s in ordered]
        diffs = [b - a for a, b in zip(xs, xs[1:])]
        at = ordered.index(step)
        others = {ordered.index(s) for s in resume_steps if s in values and s != step}
        jump, why = is_jump(diffs, at, upward_only=not tag.startswith("lr/"), boundaries=others)
        may_change = allowed if tag.startswith("lr/") else set(allowed) & LOSS_MAY_CHANGE
        if jump and may_change:
            boundary.checks[f"{tag} (per step)"] = f"changed, allowed ({', '.join(sorted(allowed))}): {why}"
        elif jump:
            boundary.checks[f"{tag} (per step)"] = f"jumps: {why}"
            broken.append(tag)
        else:
            boundary.checks[f"{tag} (per step)"] = "continues" if jump is False else why
    if broken and boundary.verdict != BROKEN:
        boundary.verdict = BROKEN
        report.notes.append(f"epoch {boundary.epoch:g}: {', '.join(broken)} broken at the resume step {step}")


def plot(report: AuditReport, path: Path) -> None:
    """The results.csv curves with every boundary marked (red: broken, grey: seamless or allowed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_results(Path(report.run_dir) / "results.csv")
    keys = [k for k in rows[0] if k != "epoch"][:8] if rows else []
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    x = list(range(1, len(rows) + 1))
    for ax, key in zip(axes.flat, keys):
        ax.plot(x, [r.get(key) for r in rows], marker="o", markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("row of results.csv", fontsize=8)
        for b in report.boundaries:
            ax.axvline(b.index + 0.5, color="#d62728" if b.verdict == BROKEN else "#7f7f7f", linestyle="--")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"ckpt audit {report.run_dir}: {'OK' if report.ok else 'BROKEN'}", fontsize=11)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
