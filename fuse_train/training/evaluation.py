"""The trainer's evaluation: validation of the EMA weights after each epoch, the epoch's row of results, and the
end-of-training figures.  A mixin of ``Trainer``: it reads the trainer's model, data and run record.
``detect_dataset`` is the one evaluation loop, also of ``fuse-train val``."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

from fuse_train.data.pairs import collate
from fuse_train.detector.metrics import DetectionMetrics, confusion_matrix, evaluate_detections, postprocess
from fuse_train.process.signals import loader_batches, worker_init
from fuse_train.training.runlog import plot_confusion, plot_curves, plot_labels


class EvaluationMixin:
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> DetectionMetrics:
        model = model or self.ema.ema
        model.eval()
        preds, gts = detect_dataset(
            model,
            self.val_set,
            self.anchors,
            self.strides,
            self.device,
            self.cfg.conf,
            self.cfg.iou,
            max(2, 2 * self.resolved.per_rank_batch),
            self.cfg.workers,
            self.amp_dtype,
            channels_last=self.use_cuda,
            pin_memory=self.use_cuda,
        )
        self._last_eval = (preds, gts)
        return evaluate_detections(preds, gts, self.model_config.nc)

    def epoch_row(self, losses: torch.Tensor, metrics: DetectionMetrics) -> dict:
        """The epoch's line of results.csv (and its TensorBoard scalars)."""
        return {
            "epoch": self.epoch + 1,
            "train/box_loss": float(losses[0]),
            "train/cls_loss": float(losses[1]),
            "metrics/precision": metrics.precision,
            "metrics/recall": metrics.recall,
            "metrics/mAP50": metrics.map50,
            "metrics/mAP50-95": metrics.map,
            "fitness": metrics.fitness,
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def log_epoch(self, row: dict, metrics: DetectionMetrics, improved: bool) -> None:
        self.log(
            f"epoch {self.epoch + 1}/{self.cfg.epochs}  box {row['train/box_loss']:.4f}  cls "
            f"{row['train/cls_loss']:.4f}"
            f"  P {metrics.precision:.3f}  R {metrics.recall:.3f}  mAP50 {metrics.map50:.3f}"
            f"  mAP50-95 {metrics.map:.3f}" + ("  (best)" if improved else "")
        )

    def final_plots(self) -> None:
        """The end-of-training figures, from the last evaluation (EMA weights) and the training labels."""
        names = self.resolved.names
        preds, gts = self._last_eval
        metrics = evaluate_detections(preds, gts, self.model_config.nc)
        plot_curves(metrics.curves, names, self.run_dir)
        plot_confusion(confusion_matrix(preds, gts, self.model_config.nc), names, self.run_dir / "confusion_matrix.png")
        plot_labels(self.train_set.labels, names, self.run_dir / "labels.png")


@torch.no_grad()
def detect_dataset(
    model,
    dataset,
    anchors,
    strides,
    device,
    conf: float,
    iou: float,
    batch: int,
    workers: int = 0,
    amp_dtype=None,
    channels_last: bool = False,
    pin_memory: bool = False,
):
    """Detections (x1 y1 x2 y2 score cls, letterboxed pixels) and ground truth (cls x1 y1 x2 y2) per image of a
    ``PairedDataset``, in order; the one evaluation loop of training's validation and ``fuse-train val``."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sequential_batches(len(dataset), batch),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=worker_init,
    )
    preds, gts = [], []
    for images, targets, _ in loader_batches(loader):  # workers ignore signals: a stop during evaluation saves
        images = images.to(device).float().div_(255)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext():
            box_raw, cls_logits = model(images)
        for i, d in enumerate(postprocess(box_raw, cls_logits, anchors, strides, conf, iou)):
            preds.append(d.cpu().double().numpy())
            gts.append(targets[targets[:, 0] == i, 1:].double().numpy())
    return preds, gts


def sequential_batches(n: int, batch: int) -> list[list[tuple[int, int]]]:
    """Batches of (epoch 0, index) keys in order (PairedDataset takes (epoch, index); evaluation is unaugmented)."""
    return [[(0, i) for i in range(s, min(n, s + batch))] for s in range(0, n, batch)]
