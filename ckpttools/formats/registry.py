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
        weights = folder_weights_file(path)
        if weights is not None:
            return open_checkpoint(weights)
    fmt = detect_format(path)
    if fmt is None:
        raise NotACheckpoint(f"{path}: not a checkpoint: {describe_non_checkpoint(path)}")
    return fmt.read(path)


def folder_weights_file(path: Path) -> Path | None:
    """The one file holding the model weights of a known checkpoint folder (Hugging Face save_pretrained,
    Trainer checkpoint-N, Accelerate save_state, DeepSpeed), which inspect, diff and convert then read;
    None for other folders.  A sharded folder is named as such (``ckpt verify`` reads every shard)."""
    layout = L.recognise_folder(path)
    if layout == L.DEEPSPEED:
        tag = (path / "latest").read_text().strip()
        candidates = sorted((path / tag).glob("mp_rank_*_model_states.pt"))
    elif layout in (L.HF, L.HF_TRAINER, L.ACCELERATE):
        candidates = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not candidates and any(path.glob("*.index.json")):
            shards = sorted(path.glob("model-*-of-*.safetensors")) or sorted(path.glob("pytorch_model-*-of-*.bin"))
            raise NotACheckpoint(f"{path}: a sharded {layout} folder ({len(shards)} weight files): `ckpt verify` "
                                 "reads every shard; inspect, diff and convert take one shard file")
    else:
        return None
    if len(candidates) != 1:
        raise NotACheckpoint(f"{path}: a {layout} folder with {len(candidates)} model weight files; name one")
    return candidates[0]
