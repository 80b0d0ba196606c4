"""Ultralytics' dataset YAML (RGB-only, and YOLOFuse's ``images/`` + ``imagesIR/`` beside it) and the label
cache Ultralytics writes when training starts, read without running its pickle.

A split is a folder of images (searched recursively), a ``.txt`` list of image paths (relative ones against the
list's folder, as Ultralytics reads them), or a list of those.  Labels live where the last ``images`` path
component becomes ``labels`` (YOLOFuse keeps its infrared partners where it becomes ``imagesIR``).

``content_fingerprint`` is ours, over what Ultralytics trains on: every image path relative to the dataset
root and its label rows.  YOLOFuse's infrared files are not in it: Ultralytics' label cache does not record
them, so a change there could not be told from the checkpoint's side.  The same value is
computed from a ``labels/<split>.cache`` (its ``labels`` list: image file, class ids, boxes), so a genuine
checkpoint, which records no fingerprint, can still be compared with the data a resume would read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpttools.datasets.layouts import IMAGE_SUFFIXES
from ckpttools.datasets.spec import DatasetError, read_yaml_mapping, twin_path
from ckpttools.pickle.unpickler import restricted_load


class UltralyticsDataError(DatasetError):
    """A dataset YAML or cache that cannot be read; the message names it."""


@dataclass
class UltralyticsData:
    yaml_path: Path
    root: Path
    splits: dict[str, list[Path]]  # split -> image files
    names: dict[int, str]


def label_path(image: Path) -> Path | None:
    folder = twin_path(image.parent, "labels")
    return (folder / image.name).with_suffix(".txt") if folder else None


def load_ultralytics_yaml(path: str | os.PathLike) -> UltralyticsData:
    yaml_path = Path(path).expanduser().resolve()
    if not yaml_path.is_file():
        raise UltralyticsDataError(
            f"{yaml_path}: data file not found (a dataset name such as coco8.yaml that "
            "Ultralytics downloads must be given as the local file it became)"
        )
    spec = read_yaml_mapping(yaml_path, "path, train, val, names", UltralyticsDataError)
    if "train" not in spec:
        raise UltralyticsDataError(f"{yaml_path}: expected a mapping with path, train, val, names")
    root = _dataset_root(spec.get("path"), yaml_path)
    names = spec.get("names") or {}
    names = dict(enumerate(names)) if isinstance(names, list) else {int(k): str(v) for k, v in names.items()}
    splits = {}
    for split in ("train", "val", "test"):
        if spec.get(split):
            splits[split] = _images(spec[split], root, yaml_path)
    return UltralyticsData(yaml_path, root, splits, names)


def _dataset_root(path, yaml_path: Path) -> Path:
    """Where Ultralytics looks for the dataset: an absolute ``path`` as it is; a relative one under its
    ``datasets_dir`` setting (read from its settings file, never by importing it), falling back to the YAML's
    folder and the working directory when that does not hold it; no ``path``: the YAML's folder."""
    if not path:
        return yaml_path.parent
    root = Path(str(path)).expanduser()
    if root.is_absolute():
        return root
    candidates = []
    settings = Path(os.environ.get("YOLO_CONFIG_DIR") or Path.home() / ".config" / "Ultralytics") / "settings.json"
    try:
        datasets_dir = json.loads(settings.read_text()).get("datasets_dir")
        if datasets_dir:
            candidates.append(Path(datasets_dir) / root)
    except (OSError, ValueError):
        pass
    candidates += [yaml_path.parent / root, Path.cwd() / root]
    return next((c.resolve() for c in candidates if c.is_dir()), candidates[-1].resolve())


def _images(entry, root: Path, yaml_path: Path) -> list[Path]:
    out: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(str(item)).expanduser()
        p = p if p.is_absolute() else (root / p)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file() and p.suffix == ".txt":
            # as Ultralytics reads a list: "./x" is relative to the list's folder, anything else as written
            for line in p.read_text(encoding="utf-8-sig").strip().splitlines():
                line = line.strip()
                if line:
                    f = p.parent / line[2:] if line.startswith("./") else Path(line)
                    if f.suffix.lower() in IMAGE_SUFFIXES:
                        out.append(Path(os.path.abspath(f)))
        else:
            raise UltralyticsDataError(f"{yaml_path}: {p} is neither a folder of images nor a .txt list")
    return sorted(dict.fromkeys(out))


def read_label_rows(path: Path | None) -> np.ndarray:
    """[n, 5] float32 rows as Ultralytics keeps them (duplicates dropped); a missing file: no objects."""
    if path is None or not path.is_file():
        return np.zeros((0, 5), np.float32)
    rows = [line.split() for line in path.read_text().strip().splitlines() if line.split()]
    try:
        arr = np.array([r[:5] for r in rows], np.float32).reshape(-1, 5)
    except ValueError:
        raise UltralyticsDataError(f"{path}: not a YOLO label file") from None
    return np.unique(arr, axis=0) if len(arr) else arr


def _fingerprint(items: list[tuple[str, np.ndarray]]) -> str:
    """sha256 over (relative image path, label rows rounded to 1e-6) sorted by path."""
    h = hashlib.sha256()
    for rel, rows in sorted(items, key=lambda x: x[0]):
        rows = np.round(rows.astype(np.float64), 6)
        rows = rows[np.lexsort(rows.T[::-1])] if len(rows) else rows
        h.update(f"{rel}|".encode() + ";".join(",".join(f"{v:.6f}" for v in r) for r in rows).encode() + b"\n")
    return h.hexdigest()


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def infrared_partner(image: Path) -> Path:
    """YOLOFuse's pairing: the infrared image is the RGB image's path with every ``images`` made ``imagesIR``."""
    return Path(str(image).replace("images", "imagesIR"))


def has_infrared(data: UltralyticsData, split: str = "train") -> bool:
    """Whether the dataset pairs its images with infrared ones (a partner of one of its first images exists)."""
    return any(infrared_partner(i).is_file() for i in data.splits.get(split, [])[:16])


def infrared_fingerprint(data: UltralyticsData, split: str = "train") -> str | None:
    """xxh3 over (relative path, bytes) of the infrared partner of every image of the split, in path order; None
    for an RGB-only dataset (no partner of its first images exists).  A missing partner counts as such."""
    import xxhash

    if not has_infrared(data, split):
        return None
    partners = [infrared_partner(i) for i in data.splits.get(split, [])]
    total = xxhash.xxh3_128()
    for p in sorted(partners):
        total.update(_rel(p, data.root).encode() + b"|")
        if p.is_file():
            one = xxhash.xxh3_128()
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    one.update(block)
            total.update(one.digest())
        else:
            total.update(b"<missing>")
    return total.hexdigest()


def content_fingerprint(data: UltralyticsData, split: str = "train") -> str:
    return _fingerprint(
        [(_rel(image, data.root), read_label_rows(label_path(image))) for image in data.splits.get(split, [])]
    )


def cache_path(data: UltralyticsData, split: str = "train") -> Path | None:
    """Where Ultralytics keeps the split's label cache: beside the label folder of its first image."""
    images = data.splits.get(split)
    label = label_path(images[0]) if images else None
    return label.parent.with_suffix(".cache") if label else None


def read_label_cache(path: Path) -> dict:
    """The dict inside an Ultralytics ``*.cache`` (a NumPy .npy holding one pickled object), read by the inert
    unpickler: nothing in it is imported or run."""
    from numpy.lib import format as npy  # the header parser only; np.load would unpickle

    stream = io.BytesIO(path.read_bytes())
    try:
        version = npy.read_magic(stream)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        descr = read_header(stream)[2]
    except (ValueError, SyntaxError) as exc:
        raise UltralyticsDataError(f"{path}: not an Ultralytics label cache ({exc})") from None
    if descr != np.dtype("O"):
        raise UltralyticsDataError(f"{path}: not an Ultralytics label cache (an array of {descr})")
    try:
        obj = restricted_load(stream)
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is one message
        raise UltralyticsDataError(f"{path}: unreadable label cache ({exc.__class__.__name__})") from None
    value = obj.item() if hasattr(obj, "item") else obj
    if not isinstance(value, dict) or not isinstance(value.get("labels"), list):
        raise UltralyticsDataError(f"{path}: a label cache without a labels list")
    return value


def cache_fingerprint(cache: dict, root: Path) -> str:
    """``content_fingerprint`` of the data as the cache recorded it (image paths relative to ``root``)."""
    items = []
    for entry in cache["labels"]:
        image = Path(str(entry.get("im_file", "")))
        cls = np.asarray(entry.get("cls", np.zeros((0, 1))), np.float32).reshape(-1, 1)
        boxes = np.asarray(entry.get("bboxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)
        rows = np.concatenate([cls, boxes], 1) if len(cls) else np.zeros((0, 5), np.float32)
        items.append((_rel(image, root), np.unique(rows, axis=0) if len(rows) else rows))
    return _fingerprint(items)
