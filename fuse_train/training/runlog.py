"""What a run writes for people to look at: results.csv, TensorBoard events and plots, all continuing exactly
across resumes.

* ``results.csv`` is rewritten from the checkpoint's own rows, so after a resume it holds exactly the epochs
  the checkpoint had, then the new ones: none duplicated, none missing.
* TensorBoard events (``events.out.tfevents.*`` in the run folder): per optimizer step the step's losses and
  the learning rate of every parameter group; per epoch the validation metrics, precision / recall and epoch
  time; the hyperparameters once.  The x axis is the global step everywhere.  On resume the writer is opened
  with ``purge_step`` = the checkpoint's step: events a killed run wrote from there on are dropped by
  TensorBoard; the scalars of the checkpoint's own step are written again from the checkpoint's record
  (``RunLog.record``), and the resumed run writes the later ones again, identical.
* An epoch's scalars, its ``results.csv`` row and ``results.png`` are written only once the checkpoint that
  holds the epoch is published (the trainer's ``published`` callback): the logs never claim an epoch the
  checkpoint does not hold.
* ``results.png`` (redrawn every epoch) with a marker at each resume and allowed change from the checkpoint's
  history; after training ``PR_curve.png``, ``F1_curve.png``, ``confusion_matrix.png`` and ``labels.png``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ckpttools.atomic import atomic_write
from ckpttools.report import counted
from ckpttools.trainers.base import event_position

RESULTS_FIELDS = [
    "epoch",
    "train/box_loss",
    "train/cls_loss",
    "metrics/precision",
    "metrics/recall",
    "metrics/mAP50",
    "metrics/mAP50-95",
    "fitness",
    "lr",
]
DETERMINISTIC_TAGS = ("train/", "lr/", "metrics/")  # time/* depends on the machine, the rest on the seed


class RunLog:
    """One run's logs; only rank 0 makes one (``enabled=False`` elsewhere makes every call a no-op).

    ``record()`` is what TensorBoard got at the latest step (saved in the checkpoint's progress).  A resume
    from a checkpoint with such a record (``replay``) purges every event from that step on, then writes the
    record again: the events of the checkpoint's own step are there exactly once, whether or not the killed run
    wrote them (an epoch's scalars wait for the save to be published, so a kill can fall in between)."""

    def __init__(
        self,
        run_dir: Path,
        step: int,
        hparams: dict,
        enabled: bool = True,
        fresh: bool = True,
        replay: dict | None = None,
    ):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        self._record: dict | None = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported when a run starts (TensorBoard is slow to load)

        self.run_dir.mkdir(parents=True, exist_ok=True)
        replayable = bool(replay) and int(replay.get("step", -1)) == step
        self.writer = SummaryWriter(str(self.run_dir), purge_step=step if replayable else step + 1, flush_secs=60)
        if fresh:
            self.writer.add_hparams(
                {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))},
                {"hparam/fitness": 0.0},
                run_name=".",
            )
        if replayable:
            self.write_scalars(step, replay["scalars"])
            self._record = {"step": step, "scalars": [list(pair) for pair in replay["scalars"]]}

    def record(self) -> dict | None:
        """The scalars written (or noted to be written) at the latest step: ``{"step", "scalars": [[tag, v]]}``."""
        if self._record is None:
            return None
        return {"step": self._record["step"], "scalars": [list(pair) for pair in self._record["scalars"]]}

    def note(self, global_step: int, scalars: list) -> None:
        """Add ``scalars`` to the record of ``global_step`` without writing them yet (see ``write_scalars``)."""
        if not self.enabled:
            return
        if self._record is None or self._record["step"] != global_step:
            self._record = {"step": global_step, "scalars": []}
        self._record["scalars"].extend([tag, float(v)] for tag, v in scalars)

    def write_scalars(self, global_step: int, scalars: list) -> None:
        if self.writer is None:
            return
        for tag, value in scalars:
            self.writer.add_scalar(tag, float(value), global_step)

    def step(self, global_step: int, losses: Sequence[float], lrs: Sequence[float]) -> None:
        if self.writer is None:
            return
        scalars = [["train/box_loss", float(losses[0])], ["train/cls_loss", float(losses[1])]]
        scalars += [[f"lr/pg{i}", float(lr)] for i, lr in enumerate(lrs)]
        self.note(global_step, scalars)  # a new step: a new record
        self.write_scalars(global_step, scalars)

    @staticmethod
    def epoch_scalars(row: dict, seconds: float) -> list:
        """An epoch's TensorBoard scalars (validation metrics, fitness, epoch time), as [tag, value] pairs."""
        keys = ("metrics/precision", "metrics/recall", "metrics/mAP50", "metrics/mAP50-95")
        return [[key, float(row[key])] for key in keys] + [
            ["metrics/fitness", float(row["fitness"])],
            ["time/epoch_seconds", float(seconds)],
        ]

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def write_results(self, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with atomic_write(self.run_dir / "results.csv", "w") as f:
            writer = csv.DictWriter(f, RESULTS_FIELDS, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# ---- plots ---------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)


def boundaries(history: list[dict], steps_per_epoch: int) -> list[tuple[float, str]]:
    """(x in epochs, label) of every resume, remap and repair in a checkpoint's history."""
    out = []
    for event in history or []:
        if event.get("event") not in ("resume", "remap", "repair") or event.get("step") is None:
            continue
        label = event["event"]
        changes = event.get("changes") or []
        if changes and label == "resume":
            label += (
                " (" + ", ".join(str(c.get("field", c)) if isinstance(c, dict) else str(c) for c in changes)[:40] + ")"
            )
        out.append((event_position(event, steps_per_epoch), f"{label} at step {event['step']}"))
    return out


def plot_results(rows: list[dict], marks: list[tuple[float, str]], path: Path) -> None:
    """results.png: losses, precision / recall, mAP and lr per epoch, with a dashed line at each resume."""
    if not rows:
        return
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    panels = [
        ("train/box_loss", "box loss"),
        ("train/cls_loss", "cls loss"),
        ("metrics/precision", "precision"),
        ("metrics/recall", "recall"),
        ("metrics/mAP50", "mAP50"),
        ("metrics/mAP50-95", "mAP50-95"),
        ("lr", "learning rate"),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.2))
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(epochs, [r[key] for r in rows], marker="o", markersize=3, linewidth=1.5, color="#1f77b4")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        for x, _label in marks:
            ax.axvline(x, color="#d62728", linestyle="--", linewidth=1)
    legend_ax = axes.flat[-1]
    legend_ax.axis("off")
    lines = [f"epoch {x:.2f}: {label}" for x, label in marks] or ["no resume: one uninterrupted run"]
    legend_ax.text(
        0.0, 1.0, "resumes (dashed red lines)\n\n" + "\n".join(lines[:12]), va="top", fontsize=9, family="monospace"
    )
    fig.suptitle(f"{path.parent.name}: {counted(len(rows), 'epoch')}", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_curves(curves: list, names: dict[int, str], folder: Path) -> None:
    """PR_curve.png and F1_curve.png from the validation detections (per class and their mean)."""
    if not curves:
        return
    plt = _pyplot()
    thresholds = np.linspace(0, 1, 1001)
    recall_grid = np.linspace(0, 1, 101)
    pr_fig, pr_ax = plt.subplots(figsize=(6.5, 5))
    f1_fig, f1_ax = plt.subplots(figsize=(6.5, 5))
    precisions, f1s = [], []
    for cls, scores, tp, n_gt in curves:
        tps = np.cumsum(tp)
        fps = np.cumsum(~tp)
        recall = tps / max(n_gt, 1)
        precision = tps / np.maximum(tps + fps, 1e-16)
        envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
        p_grid = np.interp(recall_grid, recall, envelope, right=0.0) if len(recall) else np.zeros_like(recall_grid)
        precisions.append(p_grid)
        pr_ax.plot(recall_grid, p_grid, linewidth=1, label=names.get(cls, str(cls)))
        counts = np.searchsorted(-scores, -thresholds, side="right")
        t = np.concatenate([[0], np.cumsum(tp)])[counts]
        p, r = np.where(counts > 0, t / np.maximum(counts, 1), 1.0), t / max(n_gt, 1)
        f1 = 2 * p * r / np.maximum(p + r, 1e-16)
        f1s.append(f1)
        f1_ax.plot(thresholds, f1, linewidth=1, label=names.get(cls, str(cls)))
    mean_p, mean_f1 = np.mean(precisions, 0), np.mean(f1s, 0)
    pr_ax.plot(recall_grid, mean_p, linewidth=2.5, color="k", label=f"all classes (AP50 ~ {mean_p.mean():.3f})")
    best = int(np.argmax(mean_f1))
    f1_ax.plot(
        thresholds,
        mean_f1,
        linewidth=2.5,
        color="k",
        label=f"all classes ({mean_f1[best]:.2f} at {thresholds[best]:.2f})",
    )
    for ax, xlabel, ylabel, title in (
        (pr_ax, "recall", "precision", "precision-recall (IoU 0.5)"),
        (f1_ax, "confidence", "F1", "F1 against confidence (IoU 0.5)"),
    ):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left" if ax is pr_ax else "upper right")
    for fig, name in ((pr_fig, "PR_curve.png"), (f1_fig, "F1_curve.png")):
        fig.tight_layout()
        _save(fig, folder / name)
        plt.close(fig)


def plot_confusion(matrix: np.ndarray, names: dict[int, str], path: Path) -> None:
    plt = _pyplot()
    labels = [names.get(i, str(i)) for i in range(len(matrix) - 1)] + ["background"]
    column_sums = matrix.sum(0, keepdims=True)
    normalised = matrix / np.maximum(column_sums, 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.0 * len(labels) + 2.5))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                f"{matrix[i, j]}",
                ha="center",
                va="center",
                color="white" if normalised[i, j] > 0.5 else "black",
                fontsize=9,
            )
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title("confusion matrix (conf 0.25, IoU 0.45; colour: share of each true class)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_labels(labels: list[np.ndarray], names: dict[int, str], path: Path) -> None:
    """labels.png: instances per class and the distribution of box width / height (training split)."""
    plt = _pyplot()
    rows = np.concatenate([b for b in labels if len(b)]) if any(len(b) for b in labels) else np.zeros((0, 5))
    fig, (counts_ax, size_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    ids = list(range(len(names)))
    counts = [int((rows[:, 0] == i).sum()) for i in ids]
    counts_ax.bar([names[i] for i in ids], counts, color="#1f77b4")
    counts_ax.set_title(f"instances per class ({len(rows)} in {len(labels)} images)")
    counts_ax.tick_params(axis="x", rotation=30)
    if len(rows):
        size_ax.hist2d(rows[:, 3], rows[:, 4], bins=30, range=[[0, 1], [0, 1]], cmap="Blues")
    size_ax.set_xlabel("box width (fraction of image)")
    size_ax.set_ylabel("box height (fraction of image)")
    size_ax.set_title("box sizes")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
