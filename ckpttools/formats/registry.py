"""The list of formats and the one way into a checkpoint: ``open_checkpoint``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ckpttools.errors import NotACheckpoint, UnsafeInput
from ckpttools.formats import dcp, folders, hdf5, safetensors, torch_legacy, torchzip  # folders: the folder layouts
from ckpttools.formats.base import Checkpoint, describe_non_checkpoint, regular_file_or_folder
from ckpttools.formats.confine import inside
from ckpttools.report import ERROR, Finding

# order matters only where two could claim a file: a zip is never a pickle, a pickle never safetensors
FORMATS = (torchzip, hdf5, safetensors, torch_legacy, dcp)
ZIP, LEGACY, PICKLE, SAFETENSORS, HDF5, DCP = (
    torchzip.NAME,
    torch_legacy.LEGACY,
    torch_legacy.PICKLE,
    safetensors.NAME,
    hdf5.NAME,
    dcp.NAME,
)


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
            ckpt = open_checkpoint(weights[0]) if len(weights) == 1 else _merged(path, weights)
            ckpt.findings.extend(index_findings(path))
            return ckpt
    fmt = detect_format(path)
    if fmt is None:
        raise NotACheckpoint(f"{path}: not a checkpoint: {describe_non_checkpoint(path)}")
    return fmt.read(path)


def folder_weights_files(path: Path) -> list[Path]:
    """The files holding the model weights of a known checkpoint folder (Hugging Face save_pretrained, single or
    sharded; Trainer checkpoint-N; Accelerate save_state; DeepSpeed), which inspect, diff and convert read as
    one checkpoint; [] for other folders."""
    layout = folders.recognise_folder(path)
    if layout == folders.DEEPSPEED:
        tag = (path / "latest").read_text(errors="replace").strip()
        tag_folder = inside(path, tag)
        if tag_folder is None:
            raise UnsafeInput(f"{path}: its 'latest' file names {tag!r}, outside the folder; not read")
        files = sorted(tag_folder.glob("mp_rank_*_model_states.pt"))
    elif layout in (folders.HF, folders.HF_TRAINER, folders.ACCELERATE):
        files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()][:1]
        files = files or sorted(path.glob("model-*-of-*.safetensors")) or sorted(path.glob("pytorch_model-*-of-*.bin"))
    else:
        return []
    if not files:
        raise NotACheckpoint(f"{path}: a {layout} folder without a model weights file")
    outside = [f for f in files if inside(path, str(f.relative_to(path))) is None]  # symlinks out of the folder
    if outside:
        raise UnsafeInput(f"{path}: {outside[0].name} is a link to outside the folder; not read")
    return files


INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_INDEX_BYTES = 64 << 20  # a real index is a few MB at most (one line per tensor name)


def index_findings(path: Path) -> list[Finding]:
    """Errors for a Hugging Face shard index whose ``weight_map`` names a file outside the folder (Transformers
    would load it) or one that is not there.  Nothing it names is read here."""
    findings = []
    for name in INDEX_NAMES:
        index = path / name
        if not index.is_file():
            continue
        if index.stat().st_size > MAX_INDEX_BYTES:
            findings.append(Finding(ERROR, "hf.index-unreadable", f"{name} is {index.stat().st_size} bytes", name))
            continue
        try:
            weight_map = json.loads(index.read_bytes()).get("weight_map") or {}
            shards = sorted({str(v) for v in weight_map.values()})
        except (ValueError, AttributeError):
            findings.append(
                Finding(ERROR, "hf.index-unreadable", f"{name} is not a JSON index with a weight_map", name)
            )
            continue
        for shard in shards:
            target = inside(path, shard)
            if target is None:
                findings.append(
                    Finding(
                        ERROR,
                        "hf.index-path-outside",
                        f"{name} sends tensors to {shard!r}, outside the folder (Transformers would load it); not read",
                        name,
                    )
                )
            elif not target.is_file():
                findings.append(
                    Finding(ERROR, "hf.index-file-missing", f"{name} names {shard}, which is missing", name)
                )
    return findings


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
