"""The list of formats and the one way into a checkpoint: ``open_checkpoint``."""

from __future__ import annotations

import os
from pathlib import Path

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
    fmt = detect_format(path)
    if fmt is None:
        raise NotACheckpoint(f"{path}: not a checkpoint: {describe_non_checkpoint(path)}")
    return fmt.read(path)
