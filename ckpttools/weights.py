"""Where each layout keeps its model weights (``layouts.LAYOUTS`` says which keys): the weights as a flat state
dict, the dicts a rename may edit in place, a name without wrapper prefixes, and the model's parameter count."""

from __future__ import annotations

from typing import Any

from ckpttools.layouts import FOLDER_NAMES, LAYOUTS, MODULE, PREFIXES, STATE_DICT, TORCH_EXPORT, recognise
from ckpttools.tensors import TENSOR_TYPES, LazyTensor, module_tensors


def weights_of(tree: Any, layout: str) -> tuple[str, dict[str, LazyTensor]] | None:
    """(key, flat {name: tensor}) of the model weights, walking through pickled module placeholders."""
    if layout in FOLDER_NAMES:  # a folder holds some writer's state dict: the layout of what is inside
        layout = recognise(tree)
    if layout == TORCH_EXPORT and isinstance(tree, dict):
        return "weights", flat_tensors(tree.get("weights"))
    if layout == MODULE:
        return "", module_tensors(tree)
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
        name = name[len(next(p for p in PREFIXES if name.startswith(p))) :]
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
    """The tensor entries of a state dict, by name (rebuilt ones -- quantized, sparse, ... -- included: a
    writer that cannot hold them must see them to refuse them)."""
    return {str(k): v for k, v in (d or {}).items() if isinstance(v, TENSOR_TYPES)}


BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def parameter_count(tree: Any, layout: str) -> int | None:
    """The model's own parameters: its weights (not the EMA, optimizer or RNG), batch-norm buffers left out,
    tensors sharing one storage region (tied or aliased weights) counted once.  None when the layout's weights
    cannot be found (a count of every tensor in the file would be wrong)."""
    found = weights_of(tree, layout)
    if not found:
        return None
    seen, total = set(), 0
    for name, t in found[1].items():
        if name.endswith(BUFFER_SUFFIXES):
            continue
        # a storage is one object per checkpoint; a rebuilt (quantized, sparse, ...) tensor is its own region
        region = (id(t.storage), t.storage_offset, tuple(t.shape)) if isinstance(t, LazyTensor) else (id(t),)
        if region not in seen:
            seen.add(region)
            total += t.numel
    return total
