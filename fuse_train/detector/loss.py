"""Detection loss: task-aligned assignment (TOOD / YOLOv8), CIoU box loss, BCE class loss."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fuse_train.detector.boxes import ciou
from fuse_train.detector.model import anchor_grid, decode_boxes

BOX_GAIN, CLS_GAIN = 7.5, 0.5


def pad_targets(targets: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, 6] (img, cls, x1, y1, x2, y2) -> labels [B, M], boxes [B, M, 4], mask [B, M]."""
    counts = (
        torch.bincount(targets[:, 0].long(), minlength=batch_size)
        if len(targets)
        else torch.zeros(batch_size, dtype=torch.long)
    )
    m = int(counts.max()) if batch_size else 0
    labels = torch.zeros(batch_size, m, dtype=torch.long, device=targets.device)
    boxes = torch.zeros(batch_size, m, 4, device=targets.device)
    mask = torch.zeros(batch_size, m, dtype=torch.bool, device=targets.device)
    for b in range(batch_size):
        rows = targets[targets[:, 0] == b]
        labels[b, : len(rows)] = rows[:, 1].long()
        boxes[b, : len(rows)] = rows[:, 2:6]
        mask[b, : len(rows)] = True
    return labels, boxes, mask


@torch.no_grad()
def task_aligned_assign(
    scores, pred_boxes, anchors, gt_labels, gt_boxes, gt_mask, topk=10, alpha=0.5, beta=6.0, eps=1e-9
):
    """Assign each anchor to at most one ground-truth box.

    scores [B, A, C] (probabilities), pred_boxes [B, A, 4], anchors [A, 2], gt_* [B, M, ...].
    Returns target boxes [B, A, 4], target scores [B, A, C] (IoU-aware soft labels), foreground mask [B, A].
    """
    b, a, c = scores.shape
    m = gt_boxes.shape[1]
    if m == 0:
        return (
            torch.zeros_like(pred_boxes),
            torch.zeros_like(scores),
            torch.zeros(b, a, dtype=torch.bool, device=scores.device),
        )
    lt = anchors[None, None] - gt_boxes[:, :, None, :2]
    rb = gt_boxes[:, :, None, 2:] - anchors[None, None]
    in_gt = (torch.cat([lt, rb], -1).amin(-1) > eps) & gt_mask[..., None]  # [B, M, A]
    overlaps = ciou(gt_boxes[:, :, None], pred_boxes[:, None]).clamp(min=0) * in_gt
    cls_scores = scores.gather(2, gt_labels[:, None, :].expand(b, a, m)).permute(0, 2, 1)  # [B, M, A]
    align = cls_scores.pow(alpha) * overlaps.pow(beta) * in_gt
    top = align.topk(min(topk, a), dim=-1).indices
    is_top = torch.zeros_like(align, dtype=torch.bool).scatter_(-1, top, True)
    pos = is_top & in_gt  # [B, M, A]
    # an anchor claimed by several boxes goes to the one it overlaps most
    multi = pos.sum(1, keepdim=True) > 1
    best = F.one_hot(overlaps.argmax(1), m).permute(0, 2, 1).bool()
    pos = torch.where(multi, best & in_gt, pos)
    fg = pos.any(1)  # [B, A]
    gt_index = pos.float().argmax(1)  # [B, A]
    target_boxes = gt_boxes.gather(1, gt_index[..., None].expand(b, a, 4))
    target_labels = gt_labels.gather(1, gt_index)
    align = align * pos
    norm = (align * overlaps.amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + eps)).amax(1)  # [B, A]
    target_scores = F.one_hot(target_labels, c).float() * (norm * fg)[..., None]
    return target_boxes, target_scores, fg


class DetectionLoss(nn.Module):
    """Returns (total loss for backward, detached [box, cls] components)."""

    def __init__(self, nc: int, img_size: int):
        super().__init__()
        self.nc = nc
        anchors, strides = anchor_grid(img_size)
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("strides", strides, persistent=False)

    def forward(self, outputs, targets: torch.Tensor):
        box_raw, cls_logits = outputs
        box_raw, cls_logits = box_raw.float(), cls_logits.float()
        bsz = cls_logits.shape[0]
        pred_boxes = decode_boxes(box_raw, self.anchors, self.strides)
        gt_labels, gt_boxes, gt_mask = pad_targets(targets, bsz)
        t_boxes, t_scores, fg = task_aligned_assign(
            cls_logits.detach().sigmoid(), pred_boxes.detach(), self.anchors, gt_labels, gt_boxes, gt_mask
        )
        score_sum = t_scores.sum().clamp(min=1)
        loss_cls = F.binary_cross_entropy_with_logits(cls_logits, t_scores, reduction="sum") / score_sum
        if fg.any():
            weight = t_scores.sum(-1)[fg]
            loss_box = ((1 - ciou(pred_boxes[fg], t_boxes[fg])) * weight).sum() / score_sum
        else:
            loss_box = pred_boxes.sum() * 0
        total = BOX_GAIN * loss_box + CLS_GAIN * loss_cls
        return total, torch.stack([loss_box.detach(), loss_cls.detach()])
