"""Paired RGB+IR detection data for training: any layout ``ckpttools.datasets.survey.load_split`` reads (the
YOLOFuse layout with a data.yaml, or LLVIP, M3FD, FLIR aligned, KAIST, VOC / COCO pairs as published; see
docs/datasets.md).  IR files are used as one channel; 16-bit IR is scaled by the data's ``ir_scale`` rule.

Geometry (letterbox, flip, scale, translate) is one affine transform applied to the stacked 4-channel
image, so both modalities stay aligned by construction.  Photometric jitter is drawn per modality.

Augmentation randomness comes from ``numpy.random.default_rng((seed, epoch, index))``: a sample's
augmentation depends only on the run seed, the epoch and the sample index, never on which worker loaded
it or on what ran before.  That is what makes resume (and a change of worker count) exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ckpttools.datasets.spec import DatasetError, DataSpec
from ckpttools.datasets.survey import SplitData, load_split

PAD_VALUE = 114 / 255  # letterbox border, as Ultralytics


def read_image(path: Path, mode: str, ir_scale: str = "percentile") -> np.ndarray:
    """Decode ``path`` as 'RGB' (HxWx3) or 'L' (HxW) uint8; a bad file is a DatasetError naming it.

    A 16-bit or float single-channel frame (radiometric thermal) is scaled to 8 bits by ``ir_scale``, never
    truncated: ``percentile`` maps this frame's 1st..99th percentile to 0..255 (robust to hot pixels),
    ``minmax`` its full range, ``range:LO:HI`` a fixed raw range for every frame (comparable temperatures)."""
    try:
        with Image.open(path) as im:
            if mode == "L" and im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return scale_to_8bit(np.asarray(im).astype(np.float32), ir_scale)
            return np.asarray(im.convert(mode))
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path}: refused: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc.__class__.__name__})") from None


def scale_to_8bit(raw: np.ndarray, rule: str) -> np.ndarray:
    if rule == "percentile":
        lo, hi = np.percentile(raw, (1, 99))
    elif rule == "minmax":
        lo, hi = float(raw.min()), float(raw.max())
    else:
        _, lo, hi = rule.split(":")
        lo, hi = float(lo), float(hi)
    scaled = (raw - lo) * (255.0 / max(hi - lo, 1e-6))
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


@dataclass
class Augment:
    """Augmentation strengths (all off for validation)."""

    flip: float = 0.5
    scale: float = 0.3  # zoom in [1 - scale, 1 + scale]
    translate: float = 0.1  # shift up to this fraction of the image side
    brightness: float = 0.3
    contrast: float = 0.3


NO_AUGMENT = Augment(0.0, 0.0, 0.0, 0.0, 0.0)


class PairedDataset(torch.utils.data.Dataset):
    """Yields ``(image uint8 [4, S, S] = RGB + IR, labels float32 [n, 5] = cls x1 y1 x2 y2 in pixels, index)``."""

    def __init__(
        self,
        split: SplitData,
        img_size: int,
        augment: Augment = NO_AUGMENT,
        seed: int = 0,
        ir_scale: str = "percentile",
    ):
        # labels parsed and every image header read by the dataset survey: a defect stops the run before it starts
        self.pairs, self.labels, self.ir_scale = split.pairs, split.labels, ir_scale
        self.img_size, self.augment, self.seed = img_size, augment, seed
        self.epoch = 0

    @classmethod
    def from_spec(cls, spec: DataSpec, split: str, img_size: int, augment: Augment = NO_AUGMENT, seed: int = 0):
        return cls(load_split(spec, split), img_size, augment, seed, spec.ir_scale)

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key):
        # the training sampler passes (epoch, index) so workers need no epoch state; plain ints use set_epoch's
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        rgb_path, ir_path = self.pairs[index]
        rgb, ir = read_image(rgb_path, "RGB"), read_image(ir_path, "L", self.ir_scale)
        if ir.shape[:2] != rgb.shape[:2]:  # resize IR onto the RGB grid so one transform fits both
            ir = np.asarray(Image.fromarray(ir).resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR))
        rng = np.random.default_rng((self.seed, epoch, index))
        image = torch.from_numpy(np.concatenate([rgb, ir[..., None]], axis=2)).permute(2, 0, 1).float() / 255
        image, boxes_px, keep = warp(image, self.labels[index], self.img_size, self.augment, rng)
        image = photometric(image, self.augment, rng)
        labels = np.concatenate([self.labels[index][keep, :1], boxes_px[keep]], axis=1)
        return (image * 255).round().to(torch.uint8), torch.from_numpy(labels.astype(np.float32)), index


def warp(image: torch.Tensor, labels: np.ndarray, size: int, aug: Augment, rng: np.random.Generator):
    """Letterbox + random flip/scale/translate as one affine map, applied to all channels and the boxes."""
    _, h, w = image.shape
    r = size / max(h, w)
    # forward map (input pixel coords -> output pixel coords) as a 3x3 matrix
    m = np.array([[r, 0, (size - w * r) / 2], [0, r, (size - h * r) / 2], [0, 0, 1]], np.float64)
    s = 1 + rng.uniform(-aug.scale, aug.scale) if aug.scale else 1.0
    tx, ty = (rng.uniform(-aug.translate, aug.translate, 2) * size) if aug.translate else (0.0, 0.0)
    c = size / 2
    m = np.array([[s, 0, c - s * c + tx], [0, s, c - s * c + ty], [0, 0, 1]]) @ m
    if aug.flip and rng.random() < aug.flip:
        m = np.array([[-1, 0, size], [0, 1, 0], [0, 0, 1]]) @ m
    image = _affine(image, m, size)

    boxes = labels[:, 1:5].astype(np.float64) * np.array([w, h, w, h])
    xyxy = np.stack(
        [
            boxes[:, 0] - boxes[:, 2] / 2,
            boxes[:, 1] - boxes[:, 3] / 2,
            boxes[:, 0] + boxes[:, 2] / 2,
            boxes[:, 1] + boxes[:, 3] / 2,
        ],
        1,
    )
    pts = np.stack([xyxy[:, [0, 1]], xyxy[:, [2, 3]]], 1)  # [n, 2 corners, xy]
    pts = pts @ m[:2, :2].T + m[:2, 2]
    out = np.concatenate([pts.min(1), pts.max(1)], 1)
    area0 = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1])
    out = out.clip(0, size)
    bw, bh = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    keep = (bw > 2) & (bh > 2) & (bw * bh > 0.2 * np.maximum(area0, 1e-9))
    return image, out.astype(np.float32), keep


def _affine(image: torch.Tensor, m: np.ndarray, size: int) -> torch.Tensor:
    _, h, w = image.shape
    inv = np.linalg.inv(m)
    # normalised output coords -> output pixels -> input pixels -> normalised input coords (align_corners=False)
    to_px = np.array([[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1]])
    to_norm = np.array([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]])
    theta = torch.tensor((to_norm @ inv @ to_px)[:2], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, image.shape[0], size, size], align_corners=False)
    out = F.grid_sample((image - PAD_VALUE)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0] + PAD_VALUE


def photometric(image: torch.Tensor, aug: Augment, rng: np.random.Generator) -> torch.Tensor:
    """Brightness and contrast, drawn independently for RGB (channels 0-2) and IR (channel 3)."""
    if not (aug.brightness or aug.contrast):
        return image
    out = image.clone()
    for channels in (slice(0, 3), slice(3, 4)):
        gain = 1 + rng.uniform(-aug.brightness, aug.brightness)
        contrast = 1 + rng.uniform(-aug.contrast, aug.contrast)
        part = out[channels] * gain
        mean = part.mean()
        out[channels] = (part - mean) * contrast + mean
    return out.clamp_(0, 1)


def collate(batch):
    """Stack images; labels become one [N, 6] tensor of (image index in batch, cls, x1, y1, x2, y2)."""
    images, labels, indices = zip(*batch)
    rows = [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(labels)]
    return torch.stack(images), torch.cat(rows) if rows else torch.zeros((0, 6)), torch.tensor(indices)
