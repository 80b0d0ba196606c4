"""The one reading of a dataset that ``fuse-train data check``, training and ``ckpt preflight --data`` share.

``survey(spec)`` walks the index once: every image header (both modalities), every annotation normalised to
YOLO rows, every problem collected.  ``data check`` lists the problems; training (``load_split``) refuses the
first one that blocks, with the count and the command that lists them, so a defect ``data check`` reports is
the defect training stops on (tests/test_dataset_survey.py generates defects to hold the two together).

The dataset fingerprint recorded in fuse-train checkpoints is computed here too, from the same survey
(``spec_fingerprint``).  It is versioned: ``v2:<train>:<val>`` hashes, for every layout, the layout and split
rule, each pair's relative paths and sizes, and each annotation file once.  Checkpoints written before the
version prefix carry a version-1 value (the YOLOFuse layout hashed without the rule line, a missing label as
``<none>``; published layouts exactly as version 2 without the prefix): a resume or ``ckpt preflight`` computes
the value in the version the checkpoint recorded (``like=``), so an old checkpoint is compared with like, and
the resumed run records version 2 from then on.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckpttools.datasets.index import DatasetIndex, Problem, image_size, normalised_labels
from ckpttools.datasets.spec import DatasetError, DataSpec
from ckpttools.report import counted

# problem kinds training goes on with (data check still lists them): why each is not fatal
ADVISORY = {"size-mismatch": "training resizes the infrared image onto the visible grid"}
FINGERPRINT_VERSION = "v2"


@dataclass
class Survey:
    index: DatasetIndex
    rows: list[np.ndarray]  # per index sample: [n, 5] float32 cls cx cy w h, normalised
    sizes: dict[str, Counter] = field(default_factory=lambda: {"rgb": Counter(), "ir": Counter()})
    problems: list[Problem] = field(default_factory=list)

    def blocking(self) -> list[Problem]:
        return [p for p in self.problems if p.kind not in ADVISORY]


def survey(spec: DataSpec, progress=None) -> Survey:
    """Survey ``spec`` once (kept on the spec); ``progress`` wraps the sample iterable (a progress bar)."""
    if spec._survey is None:
        spec._survey = _survey(spec, progress)
    return spec._survey


def _survey(spec: DataSpec, progress) -> Survey:
    index = spec.index()
    out = Survey(index, [], problems=list(index.problems))
    for sample in progress(index.samples) if progress else index.samples:
        sizes = {}
        for modality, path in (("rgb", sample.rgb), ("ir", sample.ir)):
            size = image_size(path)
            if isinstance(size, str):
                out.problems.append(Problem("unreadable", str(path), size))
            else:
                sizes[modality] = size
                out.sizes[modality][size] += 1
        if len(sizes) == 2 and sizes["rgb"] != sizes["ir"]:
            (w, h), (wi, hi) = sizes["rgb"], sizes["ir"]
            out.problems.append(
                Problem(
                    "size-mismatch",
                    str(sample.ir),
                    f"infrared {wi}x{hi} but visible {w}x{h} ({sample.rgb.name}); {ADVISORY['size-mismatch']}, "
                    "which is right only if the two are registered",
                )
            )
        if sample.size is None and "rgb" in sizes:  # no size in the annotation: the header just read
            sample.size = sizes["rgb"]
        rows, found = normalised_labels(sample) if sample.size is not None else ([], [])
        out.problems += found
        out.rows.append(np.array(rows, np.float32).reshape(-1, 5))
    if not index.samples:
        out.problems.append(Problem("missing", str(spec.root), "no image pairs found"))
    return out


@dataclass
class SplitData:
    """One split, ready for a dataset class: pairs and YOLO label rows per pair."""

    pairs: list[tuple[Path, Path]]
    labels: list[np.ndarray]  # [n, 5] cls cx cy w h normalised, per pair


def load_split(spec: DataSpec, split: str) -> SplitData:
    """The pairs and labels of ``split`` (train, val, or test); a dataset with a blocking problem anywhere is a
    DatasetError naming the first (``fuse-train data check`` lists them all)."""
    found = survey(spec)
    blocking = found.blocking()
    if blocking:
        raise DatasetError(
            f"{blocking[0]} ({counted(len(blocking), 'problem')} in this {spec.layout} dataset; list them "
            f"with: fuse-train data check {spec.yaml_path})"
        )
    if spec.layout == "yolofuse" and split == "test" and spec.test is None:
        raise DatasetError(f"{spec.yaml_path}: no test split (add `test:` to the data.yaml)")
    if spec.layout != "yolofuse" and split == "test":
        split = "val"  # a published test split is what fuse-train validates on (docs/datasets.md)
    chosen = [(s, rows) for s, rows in zip(found.index.samples, found.rows) if s.split == split]
    if not chosen:
        hint = (
            f"; its frames form too few recordings for a split of runs of {spec.split_block} frames: set "
            "split_block (smaller) or val_fraction in a data.yaml with layout: (docs/datasets.md)"
            if split == "val"
            and spec.layout != "yolofuse"
            and (spec.split_by == "sequence" or found.index.layout.split == "none")
            else ""
        )
        raise DatasetError(f"{spec.root}: no {split} pairs in this {spec.layout} dataset{hint}")
    return SplitData([(s.rgb, s.ir) for s, _ in chosen], [rows for _, rows in chosen])


def spec_fingerprint(spec: DataSpec, like: str | None = None) -> str:
    """``v2:<train>:<val>`` (plus the 16-bit infrared rule when it is not the default); with ``like`` a recorded
    fingerprint, the value in that fingerprint's version (module docstring)."""
    legacy = like is not None and not like.startswith(f"{FINGERPRINT_VERSION}:")
    load_split(spec, "train")  # a dataset training would refuse has no fingerprint: the same error
    if legacy and spec.layout == "yolofuse":
        parts = [_yolofuse_v1(spec, split) for split in ("train", "val")]
    else:
        parts = [_split_hash(spec, split) for split in ("train", "val")]
    out = ":".join(parts) if legacy else ":".join([FINGERPRINT_VERSION, *parts])
    return out if spec.ir_scale == "percentile" else f"{out}:ir_scale={spec.ir_scale}"


def _samples(spec: DataSpec, split: str):
    return [s for s in survey(spec).index.samples if s.split == split]


def _split_hash(spec: DataSpec, split: str) -> str:
    """sha256 over the layout and split rule, each pair's relative paths and sizes, and each annotation file once
    (a COCO JSON serves every pair), its name and content (``<none>``: a YOLO image without objects)."""
    h = hashlib.sha256(
        f"{spec.layout}|{spec.split_by}|{spec.val_fraction}|{spec.split_seed}|{spec.split_block}\n".encode()
    )
    samples = _samples(spec, split)
    for s in samples:
        for p in (s.rgb, s.ir):
            h.update(f"{_rel(p, spec.root)}|{p.stat().st_size}\n".encode())
    for label in dict.fromkeys(s.label_file for s in samples if s.label_file is not None):
        h.update(f"{_rel(label, spec.root)}|".encode() + _content(label) + b"\n")
    return h.hexdigest()


def _yolofuse_v1(spec: DataSpec, split: str) -> str:
    """Version 1 of a YOLOFuse split (checkpoints before the prefix): pairs in RGB file-name order, each pair's
    paths and sizes followed by its label's name and content."""
    h = hashlib.sha256()
    for s in sorted(_samples(spec, split), key=lambda s: s.rgb):
        for p in (s.rgb, s.ir):
            h.update(f"{_rel(p, spec.root)}|{p.stat().st_size}\n".encode())
        h.update(f"{_rel(s.label_file, spec.root)}|".encode() + _content(s.label_file) + b"\n")
    return h.hexdigest()


def _content(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b"<none>"


def _rel(path: Path, root: Path) -> str:
    """Relative to the dataset root, so a moved but identical dataset has the same fingerprint."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name
