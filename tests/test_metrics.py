import numpy as np
import pytest
import torch
from pycocotools.coco import COCO  # the dev extra; a missing install fails, never skips
from pycocotools.cocoeval import COCOeval

from fuse_train.detector.boxes import batched_nms, box_iou, nms
from fuse_train.detector.metrics import evaluate_detections


def _random_case(seed: int, n_images: int = 12, nc: int = 3):
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n_images):
        m = rng.integers(0, 6)
        xy = rng.uniform(0, 100, (m, 2))
        wh = rng.uniform(5, 40, (m, 2))
        g = np.concatenate([rng.integers(0, nc, (m, 1)), xy, xy + wh], 1)
        # detections: jittered copies of some ground truths plus random false positives
        dets = []
        for row in g:
            for _ in range(rng.integers(0, 3)):
                box = row[1:] + rng.normal(0, rng.uniform(0.5, 8), 4)
                box[2:] = np.maximum(box[2:], box[:2] + 1)
                cls = row[0] if rng.random() < 0.85 else rng.integers(0, nc)
                dets.append([*box, rng.uniform(0.05, 1), cls])
        for _ in range(rng.integers(0, 4)):
            xy = rng.uniform(0, 100, 2)
            dets.append([*xy, *(xy + rng.uniform(5, 40, 2)), rng.uniform(0, 0.7), rng.integers(0, nc)])
        preds.append(np.array(dets, float).reshape(-1, 6))
        gts.append(g.reshape(-1, 5))
    return preds, gts


def _pycocotools_map(preds, gts, nc):
    images, annotations, results = [], [], []
    for i, (p, g) in enumerate(zip(preds, gts)):
        images.append({"id": i, "width": 200, "height": 200})
        for row in g:
            x1, y1, x2, y2 = row[1:]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(row[0]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        for row in p:
            x1, y1, x2, y2, s, c = row
            results.append({"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in range(nc)]}
    coco.createIndex()
    dt = coco.loadRes(results) if results else COCO()
    ev = COCOeval(coco, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[1], ev.stats[0]  # mAP50, mAP50-95


@pytest.mark.parametrize("seed", range(6))
def test_map_agrees_with_pycocotools(seed):
    preds, gts = _random_case(seed)
    ours = evaluate_detections(preds, gts, nc=3)
    map50, map5095 = _pycocotools_map(preds, gts, 3)
    assert ours.map50 == pytest.approx(map50, abs=1e-3)
    assert ours.map == pytest.approx(map5095, abs=1e-3)


def test_perfect_predictions_score_one():
    gts = [np.array([[0, 10, 10, 50, 50], [0, 60, 60, 90, 95]], float)]
    preds = [np.array([[10, 10, 50, 50, 0.9, 0], [60, 60, 90, 95, 0.8, 0]], float)]
    m = evaluate_detections(preds, gts, nc=1)
    assert (m.map50, m.map, m.precision, m.recall) == (1.0, 1.0, 1.0, 1.0)
    assert m.fitness == pytest.approx(1.0)


def test_no_predictions_score_zero():
    m = evaluate_detections([np.zeros((0, 6))], [np.array([[0, 1, 1, 5, 5]], float)], nc=1)
    assert m.map50 == 0.0 and m.recall == 0.0


def test_nms_suppresses_overlaps_and_keeps_order():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == [3, 2]


def test_batched_nms_keeps_other_classes():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=torch.float)
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5)
    assert sorted(keep.tolist()) == [0, 1]


def test_box_iou_known_values():
    a = torch.tensor([[0, 0, 10, 10]], dtype=torch.float)
    b = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=torch.float)
    assert torch.allclose(box_iou(a, b), torch.tensor([[1.0, 1 / 3, 0.0]]))
