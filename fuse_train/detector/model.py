"""Dual-stream RGB+IR detectors in the YOLOv8 / YOLOFuse tradition.

Input is one tensor ``[B, 4, H, W]``: RGB in channels 0-2, IR in channel 3.

* ``early``: the 4 channels go through one backbone.
* ``mid``  : an RGB backbone and an IR backbone; their P3/P4/P5 features are concatenated and fused by a 1x1
             conv at each scale, then one neck and head (YOLOFuse's mid-level fusion).
* ``late`` : two complete detectors (backbone, neck, head) whose predictions are merged anchor by anchor
             (mean of box distances and class logits) before NMS: decision-level fusion.
* ``rgb`` / ``ir``: single-modality baselines.

The head is anchor-free: for every cell of the stride-8/16/32 grids it predicts the distances (left, top,
right, bottom) from the cell centre to the box sides, in strides, and one logit per class.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# (depth multiple, width multiple, max channels) as Ultralytics' n/s/m
SCALE_TABLE = {"n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768)}
STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the module; stored in every checkpoint as ``model_config``."""

    fusion: str = "mid"
    scale: str = "n"
    nc: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


class Conv(nn.Sequential):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__(
            nn.Conv2d(c1, c2, k, s, k // 2, bias=False),
            nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03),
            nn.SiLU(inplace=True),
        )


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with two convolutions (YOLOv8)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        self.cv1, self.cv2 = Conv(c1, c1 // 2), Conv(c1 // 2 * 4, c2)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


def _widths(scale: str) -> tuple[list[int], int]:
    depth, width, max_c = SCALE_TABLE[scale]
    chans = [max(8, math.ceil(min(c, max_c) * width / 8) * 8) for c in (64, 128, 256, 512, 1024)]
    return chans, max(1, round(3 * depth))


class Backbone(nn.Module):
    """Returns P3, P4, P5 feature maps (strides 8, 16, 32)."""

    def __init__(self, in_ch: int, scale: str):
        super().__init__()
        c, n = _widths(scale)
        self.stem = nn.Sequential(Conv(in_ch, c[0], 3, 2), Conv(c[0], c[1], 3, 2), C2f(c[1], c[1], n, True))
        self.p3 = nn.Sequential(Conv(c[1], c[2], 3, 2), C2f(c[2], c[2], 2 * n, True))
        self.p4 = nn.Sequential(Conv(c[2], c[3], 3, 2), C2f(c[3], c[3], 2 * n, True))
        self.p5 = nn.Sequential(Conv(c[3], c[4], 3, 2), C2f(c[4], c[4], n, True), SPPF(c[4], c[4]))
        self.channels = (c[2], c[3], c[4])

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        return p3, p4, self.p5(p4)


class Neck(nn.Module):
    """PAN-FPN: top-down then bottom-up path aggregation."""

    def __init__(self, channels: tuple[int, int, int], scale: str):
        super().__init__()
        c3, c4, c5 = channels
        _, n = _widths(scale)
        self.td4 = C2f(c5 + c4, c4, n)
        self.td3 = C2f(c4 + c3, c3, n)
        self.down3 = Conv(c3, c3, 3, 2)
        self.bu4 = C2f(c3 + c4, c4, n)
        self.down4 = Conv(c4, c4, 3, 2)
        self.bu5 = C2f(c4 + c5, c5, n)

    def forward(self, feats):
        p3, p4, p5 = feats
        t4 = self.td4(torch.cat([F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4], 1))
        n3 = self.td3(torch.cat([F.interpolate(t4, scale_factor=2.0, mode="nearest"), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], 1))
        return n3, n4, n5


class Head(nn.Module):
    """Decoupled anchor-free head. Returns (box distances raw [B, A, 4], class logits [B, A, nc])."""

    def __init__(self, channels: tuple[int, int, int], nc: int):
        super().__init__()
        self.nc = nc
        cb = max(16, channels[0] // 4, 4 * 4)
        cc = max(channels[0], min(nc, 100))
        self.box = nn.ModuleList(nn.Sequential(Conv(c, cb, 3), Conv(cb, cb, 3), nn.Conv2d(cb, 4, 1)) for c in channels)
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, cc, 3), Conv(cc, cc, 3), nn.Conv2d(cc, nc, 1)) for c in channels)
        self.reset_bias()

    def reset_bias(self, img_size: int = 640) -> None:
        for box, cls, stride in zip(self.box, self.cls, STRIDES):
            nn.init.constant_(box[-1].bias, 1.0)  # softplus(1) ~ 1.3 strides from the cell centre
            # prior: ~5 objects per image spread over the cells of this level (Ultralytics' bias_init)
            nn.init.constant_(cls[-1].bias, math.log(5 / self.nc / (img_size / stride) ** 2))

    def forward(self, feats):
        box = torch.cat([m(f).flatten(2) for m, f in zip(self.box, feats)], 2).transpose(1, 2)
        cls = torch.cat([m(f).flatten(2) for m, f in zip(self.cls, feats)], 2).transpose(1, 2)
        return box, cls


class Detector(nn.Module):
    def __init__(self, in_ch: int, scale: str, nc: int):
        super().__init__()
        self.backbone = Backbone(in_ch, scale)
        self.neck = Neck(self.backbone.channels, scale)
        self.head = Head(self.backbone.channels, nc)

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))


class FusionDetector(nn.Module):
    """One of the five fusion modes behind one interface: ``forward(x[B,4,H,W]) -> (box_raw, cls_logits)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        fusion, scale, nc = config.fusion, config.scale, config.nc
        if fusion in ("early", "rgb", "ir"):
            self.det = Detector({"early": 4, "rgb": 3, "ir": 1}[fusion], scale, nc)
        elif fusion == "late":
            self.det_rgb, self.det_ir = Detector(3, scale, nc), Detector(1, scale, nc)
        elif fusion == "mid":
            self.bb_rgb, self.bb_ir = Backbone(3, scale), Backbone(1, scale)
            chans = self.bb_rgb.channels
            self.fuse = nn.ModuleList(Conv(2 * c, c, 1) for c in chans)
            self.neck, self.head = Neck(chans, scale), Head(chans, nc)
        else:
            raise ValueError(f"unknown fusion mode {fusion!r}")

    def forward(self, x: torch.Tensor):
        rgb, ir = x[:, :3], x[:, 3:4]
        fusion = self.config.fusion
        if fusion == "early":
            return self.det(x)
        if fusion in ("rgb", "ir"):
            return self.det(rgb if fusion == "rgb" else ir)
        if fusion == "late":
            (box_a, cls_a), (box_b, cls_b) = self.det_rgb(rgb), self.det_ir(ir)
            return (box_a + box_b) / 2, (cls_a + cls_b) / 2
        feats = [f(torch.cat([a, b], 1)) for f, a, b in zip(self.fuse, self.bb_rgb(rgb), self.bb_ir(ir))]
        return self.head(self.neck(feats))

    def heads(self):
        return [m for m in self.modules() if isinstance(m, Head)]


def build_model(config: ModelConfig, img_size: int = 640) -> FusionDetector:
    model = FusionDetector(config)
    for head in model.heads():
        head.reset_bias(img_size)
    return model


def anchor_grid(img_size: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres [A, 2] (pixels) and strides [A, 1] in the order the head emits them."""
    points, strides = [], []
    for s in STRIDES:
        n = img_size // s
        ys, xs = torch.meshgrid(
            torch.arange(n, device=device, dtype=dtype), torch.arange(n, device=device, dtype=dtype), indexing="ij"
        )
        points.append(torch.stack([xs, ys], -1).reshape(-1, 2).add_(0.5).mul_(s))
        strides.append(torch.full((n * n, 1), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(strides)


def decode_boxes(box_raw: torch.Tensor, anchors: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Raw distances -> xyxy pixels."""
    ltrb = F.softplus(box_raw.float()) * strides
    return torch.cat([anchors - ltrb[..., :2], anchors + ltrb[..., 2:]], -1)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter and buffer names and shapes: the model's structure, not its values."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
    return h.hexdigest()
