"""YOLOFuse's checkpoint schema as ckpttools recognises it: the input modules only YOLOFuse's models have,
its ``ch`` run argument, and the layer graph of a pickled Ultralytics model (read from placeholders, nothing
imported).  ``layouts.py`` recognises YOLOFuse by it; ``trainers/yolofuse.py`` reads the fusion from it.  Facts
follow YOLOFuse commit 91ba7a64 (2025-10-31)."""

from __future__ import annotations

from typing import Any

from ckpttools.objects import Placeholder

STREAM_SPLIT = "ModalitySelector"  # one per stream, after IdentityInput
CHANNEL_CONCAT = "ModalConcat"  # data-level fusion: the 6 channels enter one backbone
YOLOFUSE_MODULES = frozenset({"IdentityInput", STREAM_SPLIT, CHANNEL_CONCAT})


def is_yolofuse(tree: dict) -> bool:
    """An Ultralytics checkpoint from YOLOFuse: its model holds YOLOFuse's input modules, or (a checkpoint whose
    model was stripped to None) its run arguments carry YOLOFuse's ``ch`` option."""
    args = tree.get("train_args")
    if isinstance(args, dict) and "ch" in args:  # an option YOLOFuse adds to Ultralytics' default.yaml
        return True
    return any(class_name(layer) in YOLOFUSE_MODULES for layer in layers(model_of(tree)).values())


def model_of(tree: dict) -> Any:
    for key in ("ema", "model"):
        if isinstance(tree.get(key), Placeholder):
            return tree[key]
    return None


def class_name(obj: Any) -> str:
    return obj._reference.name if isinstance(obj, Placeholder) else ""


def children(obj: Any) -> dict:
    state = obj._state if isinstance(obj, Placeholder) else None
    modules = state.get("_modules") if isinstance(state, dict) else None
    return modules if isinstance(modules, dict) else {}


def layers(model: Any) -> dict[int, Placeholder]:
    """A pickled Ultralytics ``DetectionModel``'s layers by index (its ``model`` Sequential), {} for others."""
    out: dict[int, Placeholder] = {}
    for name, layer in children(children(model).get("model")).items():
        if isinstance(layer, Placeholder) and str(name).isdigit():
            out[int(name)] = layer
    return out
