"""``ckpt convert IN OUT``: one checkpoint in another container, streaming, nothing executed.

Targets: torch zip (``.pt``), HDF5 (``.h5``), safetensors (weights), and torch.distributed.checkpoint folders
(through torch's own DCP API).  Sources: anything the safe reader opens.  Tensors are copied one at a time
from the source's records, so memory does not grow with the checkpoint (DCP is the exception: torch's DCP
functions hold the whole state dict).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpttools import layouts as L
from ckpttools.atomic import (
    atomic_path,
    check_new_output,
    clear_stale,
    ensure_space,
    temp_path,
)
from ckpttools.commands._inputs import open_input, refuse_unsafe, require_intact
from ckpttools.commands.verify import verify
from ckpttools.digest import DIGEST_KEY, refresh_digest
from ckpttools.errors import DamagedInput, UsageError
from ckpttools.formats import dcp, hdf5, safetensors, torchzip
from ckpttools.formats.base import WriteRequest, to_plain_tree
from ckpttools.formats.registry import DCP, LEGACY, Checkpoint, open_checkpoint
from ckpttools.report import counted
from ckpttools.tensors import TENSOR_TYPES, LazyTensor, TensorSource, module_tensors
from ckpttools.trees import iter_nodes, iter_tensors, map_tensors
from ckpttools.weights import flat_tensors, weights_of

PT, H5, SAFETENSORS, DCP_TARGET = "pt", "h5", "safetensors", "dcp"
WRITERS = {PT: torchzip, H5: hdf5, SAFETENSORS: safetensors, DCP_TARGET: dcp}  # each: write_converted(tree, request)
SUFFIXES = {".pt": PT, ".pth": PT, ".ckpt": PT, ".bin": PT, ".h5": H5, ".hdf5": H5, ".safetensors": SAFETENSORS}
CASTS = {
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float32": "float32",
}


@dataclass
class ConvertResult:
    input: str
    output: str
    source_format: str
    target: str
    layout: str
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    force: bool = False  # replace an existing OUT (checked up front; also decides the final rename)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "force"}


def target_of(out: Path, to: str | None) -> str:
    if to:
        if to not in WRITERS:
            raise UsageError(f"--to {to}: choose pt, h5, safetensors or dcp")
        return to
    if out.suffix.lower() in SUFFIXES:
        return SUFFIXES[out.suffix.lower()]
    if out.suffix == "" or out.is_dir():
        return DCP_TARGET
    raise UsageError(f"{out}: cannot tell the format from the suffix {out.suffix!r}; pass --to pt|h5|safetensors|dcp")


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    to: str | None = None,
    dtype: str | None = None,
    weights_only: bool = False,
    ema: bool = False,
    compress: bool = False,
    force: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    world_size: int = 1,
    allow_unsafe: bool = False,
) -> ConvertResult:
    """Write ``src`` as ``out`` in another format.  Raises ckpttools.errors exceptions for bad options and
    damaged, unsafe or unreadable inputs; ``allow_unsafe`` writes the tensors of an unsafe input (and only
    its plain data, never its code references)."""
    src, out = Path(src), Path(out)
    target = target_of(out, to)
    check_new_output(out, [src], force, folder=target == DCP_TARGET)
    if world_size < 1 or (world_size > 1 and target != DCP_TARGET):
        raise UsageError(f"--world-size {world_size}: a number of ranks >= 1, for a DCP folder output (--to dcp)")
    if dtype is not None and dtype not in CASTS:
        raise UsageError(f"--dtype {dtype}: choose fp16, bf16 or fp32")
    started = time.perf_counter()
    ckpt, dangerous = open_input(src, "convert", allow_unsafe)
    layout = L.recognise(ckpt.tree, src)
    result = ConvertResult(str(src), str(out), ckpt.format, target, layout)
    result.force = force
    result.notes.extend(clear_stale(out.parent))
    tree = ckpt.tree
    if dangerous:  # --allow-unsafe: data only, every object turned into its plain state
        tree = to_plain_tree(tree, [])
        result.notes.append(f"--allow-unsafe: written as plain data only; not carried: {', '.join(dangerous[:5])}")
    if ckpt.format == LEGACY:
        result.notes.append("legacy (pre-1.6) torch file: written in the zip format")

    if ckpt.format == DCP:
        _from_dcp(ckpt, out, target, result, dtype, weights_only, ema, compress, on_bytes)
    else:
        _convert_tree(
            ckpt,
            TensorSource(ckpt),
            tree,
            out,
            target,
            result,
            dtype,
            weights_only,
            ema,
            compress,
            on_bytes,
            world_size,
        )
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _convert_tree(
    ckpt: Checkpoint,
    source: TensorSource,
    tree: Any,
    out: Path,
    target: str,
    result: ConvertResult,
    dtype: str | None,
    weights_only: bool,
    ema: bool,
    compress: bool,
    on_bytes,
    world_size: int = 1,
) -> None:
    layout = result.layout
    if weights_only or target == SAFETENSORS:
        tree = _weights(tree, layout, ema, result)
    elif ema:
        raise UsageError("--ema picks the EMA weights: use it with --weights-only or a .safetensors output")
    if dtype:
        tree, n = cast_floats(tree, CASTS[dtype], source)
        result.notes.append(f"{counted(n, 'floating tensor')} cast to {CASTS[dtype]}")
    if (dtype or weights_only) and refresh_digest(tree, source):
        result.notes.append("content digest recomputed for the changed content")
    result.tensors, result.bytes = _count(tree)
    ensure_space(out, result.bytes * (2 if target == DCP_TARGET and world_size > 1 else 1))  # + the staging .pt

    request = WriteRequest(
        out,
        source,
        result.input,
        replace=result.force,
        on_bytes=on_bytes,
        compress=compress,
        metadata=_safetensors_metadata(ckpt, result) if target == SAFETENSORS else {},
        world_size=world_size,
        check_folder=_verified_folder(result),
        notes=result.notes,
    )
    WRITERS[target].write_converted(tree, request)


def _weights(tree: Any, layout: str, ema: bool, result: ConvertResult) -> dict[str, LazyTensor]:
    """The model (or EMA) weights as a flat state dict; what is left behind is noted."""
    if ema:
        value = tree.get("ema") if isinstance(tree, dict) else None
        if value is None:
            raise UsageError(f"{result.input}: has no EMA weights ('ema' key); drop --ema")
        flat = flat_tensors(value) if isinstance(value, dict) else module_tensors(value)
        key = "ema"
    else:
        found = weights_of(tree, layout) or weights_of(tree, L.GENERIC)  # unknown layouts: the common keys
        if found is None:
            flat = dict(iter_nodes(tree, TENSOR_TYPES, inside_found=False))
            if not flat:
                raise UsageError(f"{result.input}: no tensors found in this {layout} checkpoint")
            result.notes.append(
                f"no model weights recognised in this {layout} checkpoint: every tensor is carried, named by its path"
            )
            return flat
        key, flat = found
        source = tree.get(key) if key and isinstance(tree, dict) else tree
        if isinstance(source, dict):  # tensors the state dict holds inside tuples / lists (a dynamically
            flat.update(
                {
                    str(k): v
                    for k, v in source.items()  # quantized Linear's packed weight and bias)
                    if str(k) not in flat and any(True for _ in iter_nodes(v, TENSOR_TYPES))
                }
            )
    if not flat:
        raise UsageError(f"{result.input}: the '{key}' entry holds no tensors")
    left = sorted(str(k) for k in tree if k != key) if isinstance(tree, dict) and key else []
    result.notes.append(
        (f"weights from '{key}'" if key else "weights from the state dict")
        + f" ({counted(len(flat), 'tensor')})"
        + (f"; not carried: {', '.join(left[:30])}{' ...' if len(left) > 30 else ''}" if left else "")
    )
    return flat


def _count(tree: Any) -> tuple[int, int]:
    n = size = 0
    for _, t in iter_tensors(tree):
        n += 1
        size += t.nbytes
    return n, size


def _safetensors_metadata(ckpt: Checkpoint, result: ConvertResult) -> dict[str, str]:
    meta = {"format": "pt", "source": Path(result.input).name, "source_layout": result.layout}
    tree = ckpt.tree if isinstance(ckpt.tree, dict) else {}
    for key in ("epoch", "best_fitness", "train_args", "model_config", "date", "format_version"):
        value = tree.get(key)
        if value is not None and key != DIGEST_KEY:
            try:
                meta[key] = value if isinstance(value, str) else json.dumps(value, default=str)
            except (TypeError, ValueError):
                meta[key] = str(value)
    return meta


# ---- torch.distributed.checkpoint
# ---------------------------------------------------------------------------------------


def _verified_folder(result: ConvertResult):
    """A check run on the finished DCP folder before it is swapped in: it must pass `ckpt verify`."""

    def passes(folder: Path) -> bool:
        errors = verify(folder).errors
        if errors:
            raise DamagedInput(
                f"{result.output}: the written DCP folder would not pass `ckpt verify` "
                f"({errors[0].code}: {errors[0].message}); nothing written"
            )
        return True

    return passes


def _from_dcp(
    ckpt: Checkpoint, out: Path, target: str, result: ConvertResult, dtype, weights_only, ema, compress, on_bytes
) -> None:
    """Consolidate with torch's ``dcp_to_torch_save`` -- only ever reached after every pickle of the folder
    passed the policy (``open_input``) -- then convert that file if another target was asked for."""
    result.notes.append("DCP: consolidated by torch (dcp_to_torch_save), which holds the whole state in memory")
    if target == PT and not (dtype or weights_only or ema):
        ensure_space(out, sum(r.nbytes for r in ckpt.storages.values()))
        with atomic_path(out, replace=result.force) as tmp:
            dcp.consolidate(ckpt.path, tmp)
        result.tensors, result.bytes = _count(open_checkpoint(out).tree)
        return
    ensure_space(out, 2 * sum(r.nbytes for r in ckpt.storages.values()))  # the consolidated file and the output
    consolidated = temp_path(out, "consolidated")
    try:
        dcp.consolidate(ckpt.path, consolidated)
        inner = open_checkpoint(consolidated)
        refuse_unsafe(inner, "convert")
        require_intact(inner)
        result.layout = L.recognise(inner.tree)
        _convert_tree(
            inner, TensorSource(inner), inner.tree, out, target, result, dtype, weights_only, ema, compress, on_bytes
        )
    finally:
        consolidated.unlink(missing_ok=True)


# ---- casting ---------------------------------------------------------------------------------------------------------

CASTABLE = ("float64", "float32", "float16", "bfloat16")


def cast_floats(tree: Any, dtype: str, source: TensorSource) -> tuple[Any, int]:
    """Floating tensors cast to ``dtype`` (computed one at a time when written); returns (tree, count)."""
    import torch

    count = 0

    def cast(t: LazyTensor):
        nonlocal count
        if t.dtype not in CASTABLE or t.dtype == dtype:
            return t
        count += 1

        def make(t=t) -> bytes:
            x = t.load().to(getattr(torch, dtype)).contiguous()
            return x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""

        out = source.computed_tensor(dtype, t.shape, make, t.storage.location)
        out.requires_grad, out.parameter = t.requires_grad, t.parameter
        return out

    return map_tensors(tree, cast), count
