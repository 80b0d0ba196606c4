"""``ckpt inspect``: a readable summary of any checkpoint, from the safe reader (nothing executed)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from ckpttools import layouts as L
from ckpttools.formats.registry import open_checkpoint
from ckpttools.objects import Placeholder
from ckpttools.pickle.policy import ALLOWED_STATUS
from ckpttools.report import cap_findings, counted
from ckpttools.tensors import TENSOR_TYPES, LazyTensor, RebuiltTensor
from ckpttools.trainers.registry import rules_for
from ckpttools.trees import iter_tensors
from ckpttools.weights import parameter_count, weights_of


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Summary dict: format, layout, counters, run arguments, key tree, parameter count, bytes by dtype,
    devices, code references (judged by the safety policy).  Raises ckpttools.errors.MissingPath /
    NotACheckpoint."""
    path = Path(path)
    ckpt = open_checkpoint(path)
    tree = ckpt.tree
    layout = L.recognise_checkpoint(ckpt)
    tensors = list(iter_tensors(tree))
    # by identity: keys are only unique within one zip, and a DCP folder holds one zip per item
    storages = {id(t.storage): t.storage for _, t in tensors}
    by_dtype: Counter = Counter()
    for s in storages.values():
        by_dtype[str(s.dtype)] += s.nbytes
    devices = Counter(s.location for s in storages.values())
    weights = weights_of(tree, layout)
    shown, left_out = cap_findings(ckpt.findings)
    summary = {
        "path": str(path),
        "format": ckpt.format,
        "layout": layout,
        "epoch": tree.get("epoch") if isinstance(tree, dict) else None,
        "position": rules_for(layout).position(tree) if isinstance(tree, dict) else None,
        "model": rules_for(layout).describe(tree) if isinstance(tree, dict) else {},
        "step": _step(tree),
        "best_fitness": tree.get("best_fitness") if isinstance(tree, dict) else None,
        "run_arguments": _run_arguments(tree, layout),
        "keys": _key_tree(tree),
        "tensors": len(tensors),
        "parameter_count": parameter_count(tree, layout),
        "weights_key": weights[0] if weights else None,
        "bytes_by_dtype": dict(by_dtype.most_common()),
        "devices": dict(devices.most_common()),
        "code_references": _code_references(ckpt),
        "problems_while_reading": [f.to_dict() for f in shown],
    }
    if left_out:
        summary["problems_left_out"] = left_out
    if ckpt.metadata:
        summary["metadata"] = ckpt.metadata
    folder = L.recognise_folder(path) if path.is_dir() else None
    if folder and folder != L.DCP_LAYOUT:  # a checkpoint folder: described by its weights file
        summary["layout"], summary["weights_file"] = folder, str(ckpt.path)
        try:
            summary.update(L.folder_counters(path))
        except ValueError:  # verify reports it; inspect describes what it can
            pass
    return summary


def _code_references(ckpt) -> list[dict]:
    seen, out = set(), []
    for where, j in ckpt.safety():
        if j.status != ALLOWED_STATUS and (j.reference, j.reason) not in seen:
            seen.add((j.reference, j.reason))
            out.append(
                {"reference": j.reference, "status": j.status, "uses": list(j.uses), "reason": j.reason, "where": where}
            )
    return out


def _step(tree: Any):
    if not isinstance(tree, dict):
        return None
    if "global_step" in tree:
        return tree["global_step"]
    progress = tree.get("progress")
    return progress.get("global_step") if isinstance(progress, dict) else None


def _run_arguments(tree: Any, layout: str):
    if not isinstance(tree, dict):
        return None
    for key in ("train_args", "hyper_parameters", "args", "config"):
        value = tree.get(key)
        if isinstance(value, dict):
            return {str(k): _plain(v) for k, v in value.items()}
        if isinstance(value, Placeholder) and isinstance(value.state, dict):  # e.g. argparse.Namespace
            return {str(k): _plain(v) for k, v in value.state.items()}
    return None


def _plain(v: Any):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return repr(v)


def describe_value(v: Any) -> str:
    if isinstance(v, LazyTensor):
        return f"tensor {v.dtype} {list(v.shape)}"
    if isinstance(v, RebuiltTensor):
        return f"tensor {v.describe()}"
    if isinstance(v, dict):
        n = sum(1 for _ in iter_tensors(v))
        return f"dict ({counted(len(v), 'key')}" + (f", {counted(n, 'tensor')})" if n else ")")
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__} ({counted(len(v), 'item')})"
    if isinstance(v, Placeholder):
        n = sum(1 for _ in iter_tensors(v))
        return f"object {v._reference.qualname} (not imported" + (f", {counted(n, 'tensor')})" if n else ")")
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


KEYS_SHOWN = 50  # keys of one dict listed by inspect (text and --json alike)


def _key_tree(tree: Any, depth: int = 0) -> Any:
    if not isinstance(tree, dict):
        return describe_value(tree)
    out = {}
    for i, (k, v) in enumerate(tree.items()):
        if i == KEYS_SHOWN and len(tree) > KEYS_SHOWN + 10:  # a state dict of 200,000 tensors: a sample, a count
            out[f"... {len(tree) - KEYS_SHOWN:,} more keys"] = "not shown (the summary above counts every tensor)"
            break
        small_dict = (
            isinstance(v, dict)
            and depth < 1
            and len(v) <= 12
            and not all(isinstance(x, TENSOR_TYPES) for x in v.values())
        )
        out[str(k)] = _key_tree(v, depth + 1) if small_dict else describe_value(v)
    return out
