import pytest
import torch

from fuse_train.config import FUSIONS
from fuse_train.detector.loss import DetectionLoss, task_aligned_assign
from fuse_train.detector.model import ModelConfig, anchor_grid, build_model, decode_boxes, model_fingerprint


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_mode_predicts_every_cell(fusion):
    model = build_model(ModelConfig(fusion, "n", 3), 64)
    box, cls = model(torch.rand(2, 4, 64, 64))
    cells = (64 // 8) ** 2 + (64 // 16) ** 2 + (64 // 32) ** 2
    assert box.shape == (2, cells, 4) and cls.shape == (2, cells, 3)


def test_single_modality_baselines_ignore_the_other_modality():
    torch.manual_seed(0)
    x = torch.rand(2, 4, 64, 64)
    for fusion, other in (("rgb", slice(3, 4)), ("ir", slice(0, 3))):
        model = build_model(ModelConfig(fusion, "n", 1), 64).train()
        y = x.clone()
        y[:, other] = torch.rand_like(y[:, other])
        assert torch.equal(model(x)[1], model(y)[1])


def test_fusion_modes_use_both_modalities():
    torch.manual_seed(0)
    x = torch.rand(2, 4, 64, 64)
    for fusion in ("early", "mid", "late"):
        # train mode: batch statistics keep activations O(1) through the untrained stack
        model = build_model(ModelConfig(fusion, "n", 1), 64).train()
        for part in (slice(0, 3), slice(3, 4)):
            y = x.clone()
            y[:, part] = torch.rand_like(y[:, part])
            assert not torch.equal(model(x)[1], model(y)[1]), (fusion, part)


def test_late_fusion_is_two_detectors_merged():
    model = build_model(ModelConfig("late", "n", 1), 64).eval()
    x = torch.rand(1, 4, 64, 64)
    box_a, cls_a = model.det_rgb(x[:, :3])
    box_b, cls_b = model.det_ir(x[:, 3:])
    box, cls = model(x)
    assert torch.allclose(cls, (cls_a + cls_b) / 2) and torch.allclose(box, (box_a + box_b) / 2)


def test_scale_grows_the_model_and_changes_fingerprint():
    n = build_model(ModelConfig("mid", "n", 1), 64)
    s = build_model(ModelConfig("mid", "s", 1), 64)
    assert sum(p.numel() for p in s.parameters()) > 2 * sum(p.numel() for p in n.parameters())
    assert model_fingerprint(n) != model_fingerprint(s)
    assert model_fingerprint(n) == model_fingerprint(build_model(ModelConfig("mid", "n", 1), 64))


def test_assigner_marks_anchors_inside_the_box_only():
    anchors, strides = anchor_grid(64)
    gt = torch.tensor([[[8.0, 8.0, 40.0, 40.0]]])
    pred = decode_boxes(torch.zeros(1, len(anchors), 4), anchors, strides)
    scores = torch.full((1, len(anchors), 2), 0.5)
    boxes, target_scores, fg = task_aligned_assign(
        scores, pred, anchors, torch.tensor([[1]]), gt, torch.tensor([[True]])
    )
    assert fg.sum() > 0
    inside = ((anchors > 8) & (anchors < 40)).all(1)
    assert not (fg[0] & ~inside).any()
    assert target_scores[0, fg[0], 0].eq(0).all() and target_scores[0, fg[0], 1].gt(0).all()
    assert torch.equal(boxes[0, fg[0]], gt[0].expand(int(fg.sum()), 4))


@pytest.mark.slow  # trains for 25 steps
def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig("mid", "n", 2), 64)
    criterion = DetectionLoss(2, 64)
    x = torch.rand(4, 4, 64, 64)
    targets = torch.tensor([[0, 0, 4, 4, 30, 40], [1, 1, 20, 10, 60, 50], [3, 0, 10, 30, 20, 60]], dtype=torch.float)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    losses = []
    for _ in range(25):
        loss, parts = criterion(model(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0]


def test_loss_without_targets_is_finite():
    model = build_model(ModelConfig("early", "n", 1), 64)
    loss, parts = DetectionLoss(1, 64)(model(torch.rand(2, 4, 64, 64)), torch.zeros(0, 6))
    assert torch.isfinite(loss) and parts[0] == 0
