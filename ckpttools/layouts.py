"""Recognise whose checkpoint this is, and where its weights and optimizer state live.

Layouts are data (a table of rules), not branches spread over the code: each names the keys it needs
and where the model weights and optimizer state are found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpttools.objects import Placeholder
from ckpttools.tensors import LazyTensor
from ckpttools.trainers import fuse_train as F

# ---- wrapper prefixes: the one definition ------------------------------------------------------------------
DDP_PREFIX, COMPILE_PREFIX = "module.", "_orig_mod."
PREFIXES = (DDP_PREFIX, COMPILE_PREFIX)  # what DDP / torch.compile wrappers prepend to every weight name


def common_prefix(names) -> str | None:
    """The wrapper prefix that every one of ``names`` starts with, if any."""
    names = [n for n in names if isinstance(n, str)] if names else []
    for prefix in PREFIXES:
        if names and all(n.startswith(prefix) for n in names):
            return prefix
    return None


def with_ddp_prefix(name, add: bool):
    """``name`` with DDP's ``module.`` prefix added (``add``) or removed; non-string keys unchanged."""
    if not isinstance(name, str):
        return name
    if add:
        return name if name.startswith(DDP_PREFIX) else DDP_PREFIX + name
    return name[len(DDP_PREFIX):] if name.startswith(DDP_PREFIX) else name

FUSE_TRAIN, ULTRALYTICS, LIGHTNING, HF, STATE_DICT, DCP_LAYOUT, UNKNOWN = (
    "fuse-train", "ultralytics", "lightning", "huggingface", "state-dict", "dcp", "unknown")


@dataclass(frozen=True)
class Layout:
    name: str
    required: tuple[str, ...]  # top-level keys the layout must have
    weights: tuple[str, ...]  # candidate keys holding a state dict of weights, first found wins
    optimizer: str | None = None


LAYOUTS = {
    FUSE_TRAIN: Layout(FUSE_TRAIN, F.REQUIRED_KEYS, (F.K_MODEL, F.K_EMA), F.K_OPTIMIZER),
    ULTRALYTICS: Layout(ULTRALYTICS, ("epoch", "model"), ("ema", "model"), "optimizer"),
    LIGHTNING: Layout(LIGHTNING, ("state_dict", "epoch", "global_step"), ("state_dict",), "optimizer_states"),
    STATE_DICT: Layout(STATE_DICT, (), ("",)),
}


def recognise(tree: Any, path: Path | None = None) -> str:
    if path is not None and path.is_dir():
        return DCP_LAYOUT if (path / ".metadata").exists() else UNKNOWN
    if not isinstance(tree, dict):
        return UNKNOWN
    if F.is_fuse_train(tree):
        return FUSE_TRAIN
    if "state_dict" in tree and ({"pytorch-lightning_version", "optimizer_states", "loops", "lr_schedulers"} & tree.keys()):
        return LIGHTNING
    if ("model" in tree or "ema" in tree) and ({"train_args", "date", "version"} & tree.keys()
                                                 or _is_ultralytics_obj(tree.get("model"))):
        return ULTRALYTICS
    if tree and all(isinstance(k, str) for k in tree) and all(isinstance(v, LazyTensor) for v in tree.values()):
        return STATE_DICT
    if "state_dict" in tree and isinstance(tree["state_dict"], dict):
        return STATE_DICT
    return UNKNOWN


def _is_ultralytics_obj(obj: Any) -> bool:
    return isinstance(obj, Placeholder) and obj._reference.module.startswith("ultralytics")


def recognise_folder(path: Path) -> str | None:
    """Hugging Face-style model folders: config.json beside weights files."""
    if path.is_dir() and (path / "config.json").exists() and any(
            (path / n).exists() for n in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                                          "pytorch_model.bin.index.json")):
        return HF
    return None


def weights_of(tree: Any, layout: str) -> tuple[str, dict[str, LazyTensor]] | None:
    """(key, flat {name: tensor}) of the model weights, walking through pickled module placeholders."""
    if layout == STATE_DICT:
        if isinstance(tree, dict) and "state_dict" in tree and isinstance(tree["state_dict"], dict):
            return "state_dict", flat_tensors(tree["state_dict"])
        return "", flat_tensors(tree)
    spec = LAYOUTS.get(layout)
    if spec is None or not isinstance(tree, dict):
        return None
    for key in spec.weights:
        value = tree.get(key)
        if value is None:
            continue
        flat = flat_tensors(value) if isinstance(value, dict) else module_tensors(value)
        if flat:
            return key, flat
    return None


def unwrapped(name: str) -> str:
    """A weight name without the wrapper prefixes (``module._orig_mod.x`` -> ``x``)."""
    while name.startswith(PREFIXES):
        name = name[len(next(p for p in PREFIXES if name.startswith(p))):]
    return name


def weight_dicts(tree: Any, layout: str) -> list[tuple[str, dict]]:
    """(key, dict) for every weight state dict the layout keeps as a dict (not as a pickled module), the
    dicts themselves so callers can rename in place.  Key "" is a checkpoint that is a bare state dict."""
    if not isinstance(tree, dict):
        return []
    if layout == STATE_DICT:
        return [("state_dict", tree["state_dict"])] if isinstance(tree.get("state_dict"), dict) else [("", tree)]
    spec = LAYOUTS.get(layout)
    keys = spec.weights if spec else ("model", "ema", "state_dict")
    return [(key, tree[key]) for key in keys if isinstance(tree.get(key), dict)]


def flat_tensors(d: dict | None) -> dict[str, LazyTensor]:
    """The tensor entries of a state dict, by name."""
    return {str(k): v for k, v in (d or {}).items() if isinstance(v, LazyTensor)}


def module_tensors(obj: Any, prefix: str = "") -> dict[str, LazyTensor]:
    """The state_dict-style names of a pickled nn.Module placeholder: ``_parameters``, ``_buffers`` and
    ``_modules`` walked as torch would, without importing any of it."""
    out: dict[str, LazyTensor] = {}
    state = obj._state if isinstance(obj, Placeholder) else None
    if not isinstance(state, dict):
        return out
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if isinstance(t, LazyTensor):
                out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        out.update(module_tensors(child, f"{prefix}{name}."))
    return out
