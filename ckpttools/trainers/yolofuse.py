"""YOLOFuse (github.com/WangQvQ/YOLOFuse): an RGB+infrared fork of Ultralytics 8.3.74.  Its checkpoints are
Ultralytics checkpoints with a 6-channel input (``train_args.ch``) and a model whose first layers split the input
into an RGB and an infrared stream (``IdentityInput`` + two ``ModalitySelector``) or keep the channels together
(``ModalConcat``, data-level fusion).  Where the two streams meet says which fusion the model is: this module
reads it from the pickled model's layer graph (each Ultralytics layer records its index ``i``, its inputs ``f``
and its class), without importing any of it.  Facts follow YOLOFuse commit 91ba7a64 (2025-10-31)."""

from __future__ import annotations

from dataclasses import dataclass

from ckpttools import layouts as L
from ckpttools.objects import Placeholder
from ckpttools.trainers.ultralytics import APPLIED, UltralyticsRules
from ckpttools.trainers.yolofuse_schema import CHANNEL_CONCAT, STREAM_SPLIT, children, class_name, layers, model_of

# What YOLOFuse's `train(resume=True, <option>=new)` does: its trainer is Ultralytics 8.3.74's, whose
# check_resume applies imgsz, batch, device and close_mosaic and drops every other option without a word.
IGNORED_8_3 = "YOLOFuse (Ultralytics 8.3) ignores it on resume without a warning and keeps the checkpoint's value"
ON_RESUME = {
    "data": "YOLOFuse keeps the checkpoint's data path on resume (it takes the new one only if that path is gone)",
    "data-content": "YOLOFuse rescans the changed files and trains on them without a word",
    "batch": APPLIED.replace("Ultralytics", "YOLOFuse"),
    "img-size": APPLIED.replace("Ultralytics", "YOLOFuse"),
    "ch": "YOLOFuse ignores it on resume: the model and its input channels come from the checkpoint",
    "model": "YOLOFuse ignores it on resume: the checkpoint's model is rebuilt",
}


@dataclass(frozen=True)
class Fusion:
    kind: str  # early / mid / late, as fuse-train names them
    detail: str  # where the streams meet, in words


def _inputs(index: int, layer: Placeholder) -> list[int]:
    """The layer indexes feeding ``layer`` (Ultralytics' ``f``: -1 = the previous layer, negatives relative)."""
    f = layer._state.get("f") if isinstance(layer._state, dict) else -1
    sources = f if isinstance(f, (list, tuple)) else [f]
    return [index + s if s < 0 else s for s in sources if isinstance(s, int)]


def _own_stride(layer: Placeholder) -> float:
    """How much ``layer`` scales the stride of its input: 2 for a layer whose first convolution strides 2 (the
    downsampling ``Conv`` layers), 1/2 for a 2x ``Upsample`` (the neck), 1 for the rest."""
    state = layer._state if isinstance(layer._state, dict) else {}
    if class_name(layer) == "Upsample" and isinstance(state.get("scale_factor"), (int, float)):
        return 1 / float(state["scale_factor"])
    for child in [layer, *children(layer).values()]:
        stride = (
            child._state.get("stride") if isinstance(child, Placeholder) and isinstance(child._state, dict) else None
        )
        if class_name(child) == "Conv2d" and isinstance(stride, (tuple, list)) and stride:
            return float(stride[0])
    return 1.0


def fusion_of(tree: dict) -> Fusion | None:
    """Which fusion the checkpoint's YOLOFuse model is, from where its RGB and infrared streams first meet;
    None when the model is not there (stripped) or not a dual-stream graph."""
    graph = layers(model_of(tree))
    if not graph:
        return None
    if any(class_name(layer) == CHANNEL_CONCAT for layer in graph.values()):
        return Fusion("early", f"data level: RGB and infrared channels concatenated at the input ({CHANNEL_CONCAT})")
    streams: dict[int, frozenset[str]] = {}  # layer -> the streams it has seen
    strides: dict[int, float] = {}  # layer -> its output stride
    selectors = 0
    for index in sorted(graph):
        layer = graph[index]
        sources = [s for s in _inputs(index, layer) if s in streams]
        if class_name(layer) == STREAM_SPLIT:
            selectors += 1
            streams[index], strides[index] = frozenset({f"stream{selectors}"}), 1.0
            continue
        seen = frozenset().union(*(streams[s] for s in sources)) if sources else frozenset()
        stride = max((strides[s] for s in sources), default=1.0) * _own_stride(layer)
        streams[index], strides[index] = seen, stride
        if len(seen) >= 2:
            if class_name(layer).endswith("Detect") or index == max(graph):
                return Fusion(
                    "late", f"decision level: two streams meet only in the head, layer {index} ({class_name(layer)})"
                )
            where = f"layer {index} ({class_name(layer)}), stride {stride:g}"
            return Fusion("early" if stride <= 4 else "mid", f"feature level: two streams meet at {where}")
    return None


class YOLOFuseRules(UltralyticsRules):
    """YOLOFuse: Ultralytics' rules plus its input channels (``ch``), its fusion, and 8.3's resume behaviour."""

    layout = L.YOLOFUSE
    title = "YOLOFuse"
    fields = {**UltralyticsRules.fields, "ch": "ch"}

    def describe(self, tree: dict) -> dict[str, str]:
        out: dict[str, str] = {}
        fusion = fusion_of(tree)
        if fusion is not None:
            out["fusion"] = f"{fusion.kind} ({fusion.detail})"
        args = tree.get("train_args")
        ch = args.get("ch") if isinstance(args, dict) else None
        if isinstance(ch, int):
            out["input"] = f"{ch} channels ({'RGB + infrared' if ch == 6 else 'RGB only' if ch == 3 else 'other'})"
        return out

    def resume_consequence(self, field: str, content_only: bool) -> str | None:
        key = "data-content" if field == "data" and content_only else field
        return ON_RESUME.get(key, IGNORED_8_3)


RULES = YOLOFuseRules()
