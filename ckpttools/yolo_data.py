"""The YOLOFuse / LLVIP-YOLO dataset layout: data.yaml, paired RGB+IR folders, YOLO labels, and a dataset
fingerprint.  In ckpttools (not fuse_train) so ``ckpt preflight`` can fingerprint a dataset too.

    <root>/images/{train,val}/*.jpg|png     RGB
    <root>/imagesIR/{train,val}/<same name> IR
    <root>/labels/{train,val}/<stem>.txt    `cls cx cy w h`, normalised
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import yaml

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and what is wrong."""


@dataclass
class DataSpec:
    """A parsed data.yaml with absolute paths."""

    yaml_path: Path
    root: Path
    train: Path
    val: Path
    train_ir: Path
    val_ir: Path
    names: dict[int, str]
    imgsz: int | None


def ir_folder_for(images_dir: Path) -> Path:
    """The IR twin of an RGB folder: the one path component named exactly ``images`` becomes
    ``imagesIR`` (the last such component if several; never a substring like ``my_images``)."""
    parts = list(PurePath(images_dir).parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "imagesIR"
            return Path(*parts)
    raise DatasetError(f"{images_dir}: no path component named 'images' to derive the IR folder from; "
                       "set train_ir / val_ir in data.yaml")


def labels_folder_for(images_dir: Path) -> Path:
    parts = list(PurePath(images_dir).parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    raise DatasetError(f"{images_dir}: no path component named 'images' to derive the labels folder from")


def load_data_spec(data_yaml: str | os.PathLike) -> DataSpec:
    """Parse data.yaml (``path``, ``train``, ``val``, ``names``, optional ``train_ir``/``val_ir``/``imgsz``).

    ``path`` is taken relative to the yaml's folder when relative; the split folders relative to ``path``."""
    yaml_path = Path(data_yaml).expanduser().resolve()
    if not yaml_path.is_file():
        raise DatasetError(f"{yaml_path}: data file not found")
    try:
        spec = yaml.safe_load(yaml_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{yaml_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping with path, train, val, names")
    missing = [k for k in ("train", "val", "names") if k not in spec]
    if missing:
        raise DatasetError(f"{yaml_path}: missing key(s) {', '.join(missing)}")
    root = Path(spec.get("path") or ".").expanduser()
    root = (yaml_path.parent / root).resolve() if not root.is_absolute() else root
    names = spec["names"]
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"{yaml_path}: names must be a non-empty list or mapping")
    try:
        names = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        first = next(iter(names))
        raise DatasetError(f"{yaml_path}: names maps class ids to names ({{0: person}}), got the key {first!r}")
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{yaml_path}: class ids in names must be 0..{len(names) - 1}")

    def split(key: str) -> Path:
        value = spec[key]
        if not isinstance(value, str):
            raise DatasetError(f"{yaml_path}: {key} must be one folder path (a string)")
        return (root / value).resolve()

    train, val = split("train"), split("val")
    train_ir = split("train_ir") if "train_ir" in spec else ir_folder_for(train)
    val_ir = split("val_ir") if "val_ir" in spec else ir_folder_for(val)
    imgsz = spec.get("imgsz")
    if imgsz is not None and (isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0):
        raise DatasetError(f"{yaml_path}: imgsz must be a positive whole number of pixels, got {imgsz!r}")
    return DataSpec(yaml_path, root, train, val, train_ir, val_ir, names, imgsz)


def parse_label_file(path: Path, nc: int) -> np.ndarray:
    """Rows of (cls, cx, cy, w, h); a missing file means no objects.  Errors name file and line."""
    if not path.exists():
        return np.zeros((0, 5), np.float32)
    if not path.is_file():
        raise DatasetError(f"{path}: a label must be a text file, this is a folder or a device")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}); labels are lines 'cls cx cy w h'") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 5:
            raise DatasetError(f"{where}: expected 5 fields 'cls cx cy w h', got {len(fields)}")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DatasetError(f"{where}: not a number in {line.strip()!r}") from None
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < nc:
            raise DatasetError(f"{where}: class {fields[0]} is not an integer in 0..{nc - 1}")
        if not all(math.isfinite(v) for v in values[1:]) or not all(0.0 <= v <= 1.0 for v in values[1:]):
            raise DatasetError(f"{where}: box values must be normalised to [0, 1], got {' '.join(fields[1:])}")
        if values[3] <= 0 or values[4] <= 0:
            raise DatasetError(f"{where}: box width and height must be positive")
        rows.append(values)
    return np.array(rows, np.float32).reshape(-1, 5)


def list_pairs(images_dir: Path, ir_dir: Path) -> list[tuple[Path, Path]]:
    """(rgb, ir) file pairs, sorted by name; a missing IR partner is an error naming the file."""
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: image folder not found")
    if not ir_dir.is_dir():
        raise DatasetError(f"{ir_dir}: IR image folder not found (the IR twin of {images_dir})")
    rgb_files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not rgb_files:
        raise DatasetError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    pairs = []
    for rgb in rgb_files:
        ir = ir_dir / rgb.name
        if not ir.exists():
            raise DatasetError(f"{rgb}: no IR partner (expected {ir})")
        pairs.append((rgb, ir))
    return pairs


def dataset_fingerprint(pairs: list[tuple[Path, Path]], label_files: list[Path], root: Path) -> str:
    """sha256 over relative file names and sizes of every image, and the names and contents of every label.

    Independent of where the dataset lives, so a moved but identical dataset has the same fingerprint."""
    h = hashlib.sha256()
    for (rgb, ir), label in zip(pairs, label_files):
        for p in (rgb, ir):
            h.update(f"{_rel(p, root)}|{p.stat().st_size}\n".encode())
        h.update(f"{_rel(label, root)}|".encode())
        h.update(label.read_bytes() if label.exists() else b"<none>")
        h.update(b"\n")
    return h.hexdigest()


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def split_files(images_dir: Path, ir_dir: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(rgb, ir) pairs of a split and the label file of each (which may not exist: no objects)."""
    pairs = list_pairs(images_dir, ir_dir)
    labels_dir = labels_folder_for(images_dir)
    if not labels_dir.is_dir():
        # a missing label *file* is an image without objects (the YOLO convention); a missing *folder* is
        # almost always a mistake that would train on zero objects without a word
        raise DatasetError(f"{labels_dir}: no labels folder for {images_dir}; if every image really is background, "
                           "create the empty folder")
    return pairs, [labels_dir / (rgb.stem + ".txt") for rgb, _ in pairs]


def spec_fingerprint(spec: DataSpec) -> str:
    """``train:val`` fingerprints of a dataset, as recorded in fuse-train checkpoints."""
    return ":".join(dataset_fingerprint(*split_files(images, ir), spec.root)
                    for images, ir in ((spec.train, spec.train_ir), (spec.val, spec.val_ir)))
