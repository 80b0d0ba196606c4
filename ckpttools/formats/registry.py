"""The list of formats and the one way into a checkpoint: ``open_checkpoint``."""

from __future__ import annotations

import os
from pathlib import Path

from ckpttools import layouts as L
from ckpttools.errors import NotACheckpoint
from ckpttools.formats import dcp, hdf5, safetensors, torch_legacy, torchzip
from ckpttools.formats.base import Checkpoint, describe_non_checkpoint, regular_file_or_folder

# order matters only where two could claim a file: a zip is never a pickle, a pickle never safetensors
FORMATS = (torchzip, hdf5, safetensors, torch_legacy, dcp)
ZIP, LEGACY, PICKLE, SAFETENSORS, HDF5, DCP = (torchzip.NAME, torch_legacy.LEGACY, torch_legacy.PICKLE,
                                              safetensors.NAME, hdf5.NAME, dcp.NAME)


def detect_format(path: Path):
    """The format module that recognises ``path``, or None."""
    head = b""
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(16)
    for fmt in FORMATS:
        if (fmt is dcp) == path.is_dir() and fmt.detect(path, head):
            return fmt
    return None


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open ``path``.  Raises MissingPath, or NotACheckpoint for anything that is not a checkpoint this tool
    reads; container damage that still leaves something to describe is returned as findings."""
    path = Path(path)
    regular_file_or_folder(path)
    if path.is_dir() and not (path / ".metadata").exists():
        weights = folder_weights_files(path)
        if weights:
            return open_checkpoint(weights[0]) if len(weights) == 1 else _merged(path, weights)
    fmt = detect_format(path)
    if fmt is None:
        raise NotACheckpoint(f"{path}: not a checkpoint: {describe_non_checkpoint(path)}")
    return fmt.read(path)


def folder_weights_files(path: Path) -> list[Path]:
    """The files holding the model weights of a known checkpoint folder (Hugging Face save_pretrained, single or
    sharded; Trainer checkpoint-N; Accelerate save_state; DeepSpeed), which inspect, diff and convert read as
    one checkpoint; [] for other folders."""
    layout = L.recognise_folder(path)
    if layout == L.DEEPSPEED:
        tag = (path / "latest").read_text().strip()
        files = sorted((path / tag).glob("mp_rank_*_model_states.pt"))
    elif layout in (L.HF, L.HF_TRAINER, L.ACCELERATE):
        files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()][:1]
        files = files or sorted(path.glob("model-*-of-*.safetensors")) or sorted(path.glob("pytorch_model-*-of-*.bin"))
    else:
        return []
    if not files:
        raise NotACheckpoint(f"{path}: a {layout} folder without a model weights file")
    return files


def _merged(path: Path, files: list[Path]) -> Checkpoint:
    """The shards of a sharded weights folder as one checkpoint: one name space, each storage read from its
    shard.  A name found in two shards is an error (the index would be ambiguous)."""
    parts = [open_checkpoint(f) for f in files]
    merged = Checkpoint(path, parts[0].format, tree={})
    owner: dict[int, Checkpoint] = {}
    for f, part in zip(files, parts):
        for finding in part.findings:
            finding.where = f"{f.name}: {finding.where}" if finding.where else f.name
            merged.findings.append(finding)
        merged.scans += [(f"{f.name}: {where}", scan) for where, scan in part.scans]
        for name, value in (part.tree or {}).items():
            if name in merged.tree:
                raise NotACheckpoint(f"{path}: {name!r} is in two shards ({f.name} and another)")
            merged.tree[name] = value
        for key, ref in part.storages.items():  # every reader registers each storage of its tree here
            owner[id(ref)] = part
            merged.storages[f"{f.name}:{key}"] = ref  # shard-local keys ("0", "1", ...) can repeat
        merged.metadata.update(part.metadata)
    merged.iter_storage = lambda ref, chunk: owner[id(ref)].storage_chunks(ref, chunk)
    return merged
