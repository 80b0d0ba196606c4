"""After training: ``val``, ``predict`` and ``export`` on a checkpoint.

The checkpoint is the single source: the model is rebuilt from its ``model_config`` and run record (as
nanoGPT rebuilds from ``model_args``), after the file passes ``ckpt verify``'s integrity checks (CRC32s,
digest) and is read with ``torch.load(weights_only=True)``, which executes nothing.  The EMA weights are the
ones evaluated, predicted with and exported, as during training.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ckpttools.atomic import atomic_write
from ckpttools.datasets.layouts import IMAGE_SUFFIXES
from ckpttools.trainers import fuse_train_schema as S
from fuse_train.checkpoint.reading import ResumeError, integrity_problem, load_checkpoint
from fuse_train.config import ResolvedRun, RunConfig
from fuse_train.data.demo import make_scene
from fuse_train.data.pairs import NO_AUGMENT, read_image, warp
from fuse_train.detector.boxes import batched_nms
from fuse_train.detector.metrics import postprocess
from fuse_train.detector.model import ModelConfig, anchor_grid, build_model, decode_boxes
from fuse_train.failures import InferenceError
from fuse_train.process.devices import select_device
from fuse_train.training.evaluation import detect_dataset


@dataclass
class LoadedDetector:
    path: Path
    model: torch.nn.Module
    cfg: RunConfig
    resolved: ResolvedRun
    names: dict[int, str]
    img_size: int
    device: torch.device

    def anchors(self):
        return anchor_grid(self.img_size, self.device)

    def detect(self, dataset, conf: float, iou: float, batch: int = 16) -> tuple[list, list]:
        """Detections and ground truth per image of ``dataset``, by training's evaluation loop."""
        return detect_dataset(self.model, dataset, *self.anchors(), self.device, conf, iou, batch)


def load_detector(weights: str | Path, device: str = "cpu", verify: bool = True) -> LoadedDetector:
    path = Path(weights).expanduser()
    if not (path.is_file() or path.is_dir()):  # a .pt file, or a --save-format dcp folder
        raise InferenceError(f"{path}: no such checkpoint")
    if verify:
        problem = integrity_problem(path)
        if problem is not None:
            raise InferenceError(f"{path}: fails `ckpt verify`: {problem}")
    try:
        ckpt = load_checkpoint(path)
    except ResumeError as exc:
        raise InferenceError(str(exc)) from None
    config = ModelConfig(**ckpt[S.K_MODEL_CONFIG])
    resolved = ResolvedRun.from_dict(ckpt[S.K_RESOLVED])
    model = build_model(config, resolved.img_size)
    weights_dict = ckpt.get(S.K_EMA) or ckpt[S.K_MODEL]
    model.load_state_dict(weights_dict)
    dev = select_device(device)
    return LoadedDetector(
        path,
        model.to(dev).eval(),
        RunConfig.from_dict(ckpt[S.K_TRAIN_ARGS]),
        resolved,
        dict(resolved.names),
        resolved.img_size,
        dev,
    )


# ---- predict -----------------------------------------------------------------------------------------------


def letterbox_pair(rgb: np.ndarray, ir: np.ndarray, size: int) -> tuple[torch.Tensor, float, tuple[float, float]]:
    """The [4, size, size] float input of one pair, the scale and the padding (to map boxes back)."""
    if ir.shape[:2] != rgb.shape[:2]:
        ir = np.asarray(Image.fromarray(ir).resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR))
    image = torch.from_numpy(np.concatenate([rgb, ir[..., None]], axis=2)).permute(2, 0, 1).float() / 255
    out, _, _ = warp(image, np.zeros((0, 5)), size, NO_AUGMENT, np.random.default_rng(0))
    h, w = rgb.shape[:2]
    r = size / max(h, w)
    # the 8-bit rounding training applies to every input (PairedDataset yields uint8)
    return (out * 255).round().clamp(0, 255) / 255, r, ((size - w * r) / 2, (size - h * r) / 2)


def pair_sources(source: str, source_ir: str | None) -> list[tuple[Path, Path]]:
    """(visible, infrared) files: two files, or two folders paired by file stem."""
    rgb = Path(source).expanduser()
    if source_ir is None:
        raise InferenceError("--source-ir is needed: the model sees both modalities")
    ir = Path(source_ir).expanduser()
    for p in (rgb, ir):
        if not p.exists():
            raise InferenceError(f"{p}: no such file or folder")
    if rgb.is_file() and ir.is_file():
        return [(rgb, ir)]
    if rgb.is_dir() and ir.is_dir():
        irs = {p.stem: p for p in sorted(ir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        pairs = [
            (p, irs[p.stem]) for p in sorted(rgb.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in irs
        ]
        if not pairs:
            raise InferenceError(f"{rgb}: no image has a partner of the same name in {ir}")
        return pairs
    raise InferenceError(f"{rgb}, {ir}: give two image files or two folders")


@torch.no_grad()
def predict_pairs(
    det: LoadedDetector,
    pairs: list[tuple[Path, Path]],
    out_dir: Path,
    conf: float = 0.25,
    iou: float = 0.7,
    ir_scale: str = "percentile",
) -> list[dict]:
    """Detect on each pair; write ``NAME.jpg`` (visible | infrared side by side, boxes drawn on both),
    ``labels/NAME.txt`` (YOLO: cls cx cy w h conf) and ``predictions.json``; return the records."""
    anchors, strides = det.anchors()
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    records = []
    for rgb_path, ir_path in pairs:
        rgb, ir = read_image(rgb_path, "RGB"), read_image(ir_path, "L", ir_scale)
        x, r, (px, py) = letterbox_pair(rgb, ir, det.img_size)
        box_raw, cls_logits = det.model(x[None].to(det.device))
        d = postprocess(box_raw, cls_logits, anchors, strides, conf, iou)[0].cpu().double().numpy()
        h, w = rgb.shape[:2]
        boxes = []
        for x1, y1, x2, y2, score, cls in d:
            bx = [
                float(np.clip((x1 - px) / r, 0, w)),
                float(np.clip((y1 - py) / r, 0, h)),
                float(np.clip((x2 - px) / r, 0, w)),
                float(np.clip((y2 - py) / r, 0, h)),
            ]
            boxes.append(
                {
                    "class": int(cls),
                    "name": det.names.get(int(cls), str(int(cls))),
                    "score": float(score),
                    "xyxy": [round(v, 2) for v in bx],
                }
            )
        stem = rgb_path.stem
        _draw(rgb, ir, boxes, out_dir / f"{stem}.jpg")
        with atomic_write(out_dir / "labels" / f"{stem}.txt", "w") as f:
            for b in boxes:
                x1, y1, x2, y2 = b["xyxy"]
                f.write(
                    f"{b['class']} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                    f"{(y2 - y1) / h:.6f} {b['score']:.5f}\n"
                )
        records.append({"rgb": str(rgb_path), "ir": str(ir_path), "width": w, "height": h, "boxes": boxes})
    with atomic_write(out_dir / "predictions.json", "w") as f:
        json.dump({"weights": str(det.path), "conf": conf, "iou": iou, "images": records}, f, indent=1)
    return records


COLOURS = [(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 178, 29), (207, 210, 49), (146, 204, 23)]


MIN_DRAWN_WIDTH = 320  # small images are enlarged (whole pixels) before drawing, so labels stay readable


def _draw(rgb: np.ndarray, ir: np.ndarray, boxes: list[dict], path: Path) -> None:
    """visible | infrared side by side, every box on both, each label on a filled tag kept inside its panel
    and moved off the tags already placed."""
    h, w = rgb.shape[:2]
    ir_rgb = np.asarray(Image.fromarray(ir).resize((w, h)).convert("RGB"))
    scale = min(4, -(-MIN_DRAWN_WIDTH // w)) if w < MIN_DRAWN_WIDTH else 1
    canvas = Image.fromarray(np.concatenate([rgb, ir_rgb], axis=1))
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    pw, ph = w * scale, h * scale  # one panel
    line = max(1, round(pw / 320))
    placed: list[tuple[float, float, float, float]] = []  # tags in panel coordinates (the same in both panels)
    for b in sorted(boxes, key=lambda b: -b["score"]):  # the surest first: it gets the best place
        colour = COLOURS[b["class"] % len(COLOURS)]
        x1, y1, x2, y2 = (v * scale for v in b["xyxy"])
        text = f"{b['name']} {b['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        tw, th = right - left + 2, bottom - top + 2
        tag = _tag_place(x1, y1, y2, tw, th, pw, ph, placed)
        placed.append(tag)
        for offset in (0, pw):
            draw.rectangle([x1 + offset, y1, x2 + offset, y2], outline=colour, width=line)
            tx, ty = tag[0] + offset, tag[1]
            draw.rectangle([tx, ty, tx + tw, ty + th], fill=colour)
            draw.text((tx + 1 - left, ty + 1 - top), text, fill=(0, 0, 0))
    with atomic_write(path, "wb") as f:
        canvas.save(f, format="JPEG", quality=92)


def _tag_place(x1, y1, y2, tw, th, pw, ph, placed) -> tuple[float, float, float, float]:
    """Where a label tag goes: above the box, else inside its top, else below; clamped to the panel, and moved
    down or up past tags already there (a few tries, then above the box regardless)."""
    x = min(max(0.0, x1), max(0.0, pw - tw))
    candidates = [y1 - th, y1, y2]
    candidates += [c + sign * k * th for k in range(1, 6) for sign in (1, -1) for c in candidates[:3]]
    for y in candidates:
        y = min(max(0.0, y), max(0.0, ph - th))
        box = (x, y, x + tw, y + th)
        if not any(_overlap(box, other) for other in placed):
            return box
    y = min(max(0.0, y1 - th), max(0.0, ph - th))
    return (x, y, x + tw, y + th)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ---- export ------------------------------------------------------------------------------------------------


class _TwoInputDetector(torch.nn.Module):
    """The ONNX graph's interface: rgb [B, 3, S, S] and ir [B, 1, S, S] in [0, 1] -> boxes [B, A, 4] (xyxy
    pixels of the letterboxed input) and scores [B, A, nc] (sigmoid); NMS is left to the caller."""

    def __init__(self, model: torch.nn.Module, img_size: int):
        super().__init__()
        self.model = model
        anchors, strides = anchor_grid(img_size)
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("strides", strides, persistent=False)

    def forward(self, rgb: torch.Tensor, ir: torch.Tensor):
        box_raw, cls_logits = self.model(torch.cat([rgb, ir], 1))
        return decode_boxes(box_raw, self.anchors, self.strides), cls_logits.sigmoid()


def export_onnx(det: LoadedDetector, out: Path, opset: int = 18) -> Path:
    """Write the two-input ONNX model atomically; the legacy TorchScript exporter (no onnxscript needed)."""
    import onnx  # an optional extra, loaded when exporting

    wrapper = _TwoInputDetector(det.model.cpu(), det.img_size).eval()
    s = det.img_size
    example = (torch.rand(1, 3, s, s), torch.rand(1, 1, s, s))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices are not the user's concern
        torch.onnx.export(
            wrapper,
            example,
            buffer,
            input_names=["rgb", "ir"],
            output_names=["boxes", "scores"],
            dynamic_axes={"rgb": {0: "batch"}, "ir": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
        with torch.no_grad():
            boxes, scores = wrapper(*example)
    model = onnx.load_from_string(buffer.getvalue())
    # the exporter names the fixed dimensions of the outputs after its own nodes (Concatboxes_dim_1): state them
    for output, shape in zip(model.graph.output, (boxes.shape, scores.shape)):
        for dim, size in zip(list(output.type.tensor_type.shape.dim)[1:], shape[1:]):
            dim.ClearField("dim_param")
            dim.dim_value = int(size)
    with atomic_write(out, "wb") as f:
        f.write(model.SerializeToString())
    det.model.eval()
    return out


def check_onnx(
    det: LoadedDetector,
    onnx_path: Path,
    pair: tuple[np.ndarray, np.ndarray] | None = None,
    conf: float = 0.25,
    iou: float = 0.7,
) -> dict:
    """Run the exported model with onnxruntime on one pair (default: a demo scene) and compare to PyTorch: raw
    outputs, and the boxes after the same NMS."""
    import onnxruntime as ort  # an optional extra, loaded when checking an export

    rgb, ir = pair if pair is not None else make_scene(12345, det.img_size)[:2]
    x, _, _ = letterbox_pair(rgb, ir, det.img_size)
    x = x[None]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    boxes_o, scores_o = session.run(None, {"rgb": x[:, :3].numpy(), "ir": x[:, 3:].numpy()})
    with torch.no_grad():
        boxes_t, scores_t = _TwoInputDetector(det.model.cpu(), det.img_size).eval()(x[:, :3], x[:, 3:])

    def nms(boxes, scores):
        boxes, scores = torch.as_tensor(boxes[0]), torch.as_tensor(scores[0])
        a, c = (scores > conf).nonzero(as_tuple=True)
        keep = batched_nms(boxes[a], scores[a, c], c, iou)
        return torch.cat([boxes[a][keep], scores[a, c][keep, None]], 1).numpy()

    kept_o, kept_t = nms(boxes_o, scores_o), nms(boxes_t.numpy(), scores_t.numpy())
    same_count = len(kept_o) == len(kept_t)
    return {
        "max_abs_diff_boxes": float(np.abs(boxes_o - boxes_t.numpy()).max()),
        "max_abs_diff_scores": float(np.abs(scores_o - scores_t.numpy()).max()),
        "detections_torch": len(kept_t),
        "detections_onnx": len(kept_o),
        "max_abs_diff_kept_boxes": float(np.abs(kept_o - kept_t).max()) if same_count and len(kept_t) else 0.0,
        "same_detections": bool(same_count),
    }
