"""Post-processing and COCO-style detection metrics.

``evaluate_detections`` follows pycocotools' bbox evaluation (area range "all", 100 detections per image
per class): greedy matching in score order to the best still-unmatched ground truth with IoU >= t, for
t = 0.50:0.05:0.95, then precision made monotone and sampled at 101 recall points.  Classes without
ground truth are left out of the mean, as in COCOeval.  A test checks it against pycocotools.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fuse_train.detector.boxes import batched_nms
from fuse_train.detector.model import decode_boxes

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def postprocess(
    box_raw,
    cls_logits,
    anchors,
    strides,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    max_nms: int = 3000,
) -> list[torch.Tensor]:
    """Per image: [n, 6] tensor of (x1, y1, x2, y2, score, cls) after class-aware NMS."""
    boxes = decode_boxes(box_raw, anchors, strides)
    scores = cls_logits.float().sigmoid()
    out = []
    for b in range(boxes.shape[0]):
        anchor_idx, cls_idx = (scores[b] > conf).nonzero(as_tuple=True)  # multi-label, as Ultralytics val
        s = scores[b, anchor_idx, cls_idx]
        if len(s) > max_nms:
            top = s.topk(max_nms).indices
            anchor_idx, cls_idx, s = anchor_idx[top], cls_idx[top], s[top]
        bx = boxes[b, anchor_idx]
        keep = batched_nms(bx, s, cls_idx, iou)[:max_det]
        out.append(torch.cat([bx[keep], s[keep, None], cls_idx[keep, None].float()], 1))
    return out


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)

    def area(x):
        return (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])

    return inter / (area(a)[:, None] + area(b)[None] - inter)


@dataclass
class DetectionMetrics:
    precision: float
    recall: float
    map50: float
    map: float  # mAP50-95
    # per class with ground truth: (class id, scores sorted descending, tp at IoU 0.5, number of gt) for the
    # PR / F1 curves; not part of as_dict (nor of the checkpoint)
    curves: list = field(default_factory=list, repr=False)
    # per class with ground truth: {class, instances, precision, recall, mAP50, mAP50-95}; P and R at the
    # confidence that maximises the mean F1 (the same threshold for every class, as Ultralytics' val table)
    per_class: list = field(default_factory=list, repr=False)

    @property
    def fitness(self) -> float:
        return 0.1 * self.map50 + 0.9 * self.map

    def as_dict(self) -> dict[str, float]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "mAP50": self.map50,
            "mAP50-95": self.map,
            "fitness": self.fitness,
        }


def evaluate_detections(
    predictions: list[np.ndarray], ground_truth: list[np.ndarray], nc: int, max_dets: int = 100
) -> DetectionMetrics:
    """predictions[i]: [n, 6] (x1, y1, x2, y2, score, cls); ground_truth[i]: [m, 5] (cls, x1, y1, x2, y2)."""
    ap = np.full((len(IOU_THRESHOLDS), nc), -1.0)
    pr_at = []  # per class: (scores, tp at IoU 0.5, number of gt) for precision / recall
    classes = []
    for c in range(nc):
        scores, matched, n_gt = [], [], 0
        for pred, gt in zip(predictions, ground_truth):
            g = gt[gt[:, 0] == c, 1:5]
            d = pred[pred[:, 5] == c]
            d = d[np.argsort(-d[:, 4], kind="mergesort")][:max_dets]
            n_gt += len(g)
            ious = _iou_matrix(d[:, :4], g)
            tp = np.zeros((len(IOU_THRESHOLDS), len(d)), bool)
            for ti, t in enumerate(IOU_THRESHOLDS):
                taken = np.zeros(len(g), bool)
                for di in range(len(d)):
                    best, best_iou = -1, min(t, 1 - 1e-10)
                    for gi in range(len(g)):
                        if not taken[gi] and ious[di, gi] >= best_iou:
                            best, best_iou = gi, ious[di, gi]
                    if best >= 0:
                        taken[best], tp[ti, di] = True, True
            scores.append(d[:, 4])
            matched.append(tp)
        if n_gt == 0:
            continue
        scores_c = np.concatenate(scores) if scores else np.zeros(0)
        tp_c = np.concatenate(matched, 1) if matched else np.zeros((len(IOU_THRESHOLDS), 0), bool)
        order = np.argsort(-scores_c, kind="mergesort")
        tp_c, scores_c = tp_c[:, order], scores_c[order]
        for ti in range(len(IOU_THRESHOLDS)):
            ap[ti, c] = _average_precision(tp_c[ti], n_gt)
        pr_at.append((scores_c, tp_c[0], n_gt))
        classes.append(c)
    valid = ap[0] > -1
    if not valid.any():
        return DetectionMetrics(0.0, 0.0, 0.0, 0.0)
    precision, recall, p_c, r_c = _best_f1_point(pr_at)
    per_class = [
        {
            "class": c,
            "instances": int(n_gt),
            "precision": float(p_c[k]),
            "recall": float(r_c[k]),
            "mAP50": float(ap[0, c]),
            "mAP50-95": float(ap[:, c].mean()),
        }
        for k, (c, (_, _, n_gt)) in enumerate(zip(classes, pr_at))
    ]
    return DetectionMetrics(
        precision,
        recall,
        float(ap[0, valid].mean()),
        float(ap[:, valid].mean()),
        [(c, *curve) for c, curve in zip(classes, pr_at)],
        per_class,
    )


def confusion_matrix(
    predictions: list[np.ndarray], ground_truth: list[np.ndarray], nc: int, conf: float = 0.25, iou: float = 0.45
) -> np.ndarray:
    """[nc + 1, nc + 1] counts, rows = predicted class (last: background, a missed object), columns = true class
    (last: background, a false detection); detections above ``conf`` matched to boxes greedily by IoU."""
    m = np.zeros((nc + 1, nc + 1), np.int64)
    for pred, gt in zip(predictions, ground_truth):
        d = pred[pred[:, 4] >= conf]
        d = d[np.argsort(-d[:, 4], kind="mergesort")]
        ious = _iou_matrix(d[:, :4], gt[:, 1:5])
        taken = np.zeros(len(gt), bool)
        for di in range(len(d)):
            candidates = np.where(~taken & (ious[di] >= iou))[0] if len(gt) else []
            if len(candidates):
                gi = candidates[np.argmax(ious[di, candidates])]
                taken[gi] = True
                m[int(d[di, 5]), int(gt[gi, 0])] += 1
            else:
                m[int(d[di, 5]), nc] += 1
        for gi in np.where(~taken)[0]:
            m[nc, int(gt[gi, 0])] += 1
    return m


def _average_precision(tp: np.ndarray, n_gt: int) -> float:
    """COCO 101-point interpolated AP from detections sorted by score."""
    tps = np.cumsum(tp)
    fps = np.cumsum(~tp)
    recall = tps / n_gt
    precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.zeros(len(RECALL_POINTS))
    valid = idx < len(precision)
    q[valid] = precision[idx[valid]]
    return float(q.mean())


def _best_f1_point(per_class):
    """Mean precision and recall over classes at the confidence threshold that maximises mean F1 (IoU 0.5),
    and each class's precision and recall at that threshold."""
    thresholds = np.linspace(0, 1, 1001)
    p_all, r_all = [], []
    for scores, tp, n_gt in per_class:
        # detections with score >= threshold: scores are sorted descending
        counts = np.searchsorted(-scores, -thresholds, side="right")
        tps = np.concatenate([[0], np.cumsum(tp)])[counts]
        p_all.append(np.where(counts > 0, tps / np.maximum(counts, 1), 1.0))
        r_all.append(tps / n_gt)
    p, r = np.mean(p_all, 0), np.mean(r_all, 0)
    f1 = 2 * p * r / np.maximum(p + r, 1e-16)
    i = int(np.argmax(f1))
    return float(p[i]), float(r[i]), [float(x[i]) for x in p_all], [float(x[i]) for x in r_all]
