"""The YOLOFuse / LLVIP-YOLO dataset layout: data.yaml, paired RGB+IR folders, YOLO labels, and a dataset
fingerprint.  In ckpttools (not fuse_train) so ``ckpt preflight`` can fingerprint a dataset too.

    <root>/images/{train,val}/*.jpg|png     RGB
    <root>/imagesIR/{train,val}/<same name> IR
    <root>/labels/{train,val}/<stem>.txt    `cls cx cy w h`, normalised
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath

import numpy as np
import yaml

from ckpttools.datasets.annotations import parse_yolo
from ckpttools.datasets.index import (
    DatasetIndex,
    Problem,
    detect_layout,
    index_dataset,
    layout_named,
    normalised_labels,
)
from ckpttools.datasets.layouts import BY_NAME, IMAGE_SUFFIXES, LAYOUTS, Layout

IR_SCALES = ("percentile", "minmax")  # and "range:LO:HI"; how 16-bit infrared becomes 8-bit (docs/datasets.md)


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and what is wrong."""


@dataclass
class DataSpec:
    """A parsed data.yaml (or a dataset folder of a known layout) with absolute paths.

    For the YOLOFuse layout ``train``/``val`` (and ``test``) are the RGB folders; for a published layout
    (``layout`` is not ``yolofuse``) the pairs come from ``index`` and the split options below."""

    yaml_path: Path  # the data.yaml, or the dataset folder itself when given one
    root: Path
    train: Path | None
    val: Path | None
    train_ir: Path | None
    val_ir: Path | None
    names: dict[int, str]
    imgsz: int | None
    layout: str = "yolofuse"
    split_by: str = "native"
    val_fraction: float = 0.1
    split_seed: int = 0
    split_block: int = 20
    ir_scale: str = "percentile"
    test: Path | None = None
    test_ir: Path | None = None
    _index: object = field(default=None, repr=False, compare=False)

    def index(self):
        """The DatasetIndex of a published layout (built once)."""
        if self._index is None:
            self._index = index_dataset(
                self.root,
                layout_named(self.layout),
                self.names or None,
                self.split_by,
                self.val_fraction,
                self.split_seed,
                self.split_block,
            )
        return self._index


@dataclass
class SplitData:
    """One split, ready for a dataset class: pairs, YOLO label rows per pair, and the annotation files read."""

    pairs: list[tuple[Path, Path]]
    labels: list[np.ndarray]  # [n, 5] cls cx cy w h normalised, per pair
    label_files: list[Path]  # per pair (may not exist: no objects); for a COCO layout the one JSON


def ir_folder_for(images_dir: Path) -> Path:
    """The IR twin of an RGB folder: the one path component named exactly ``images`` becomes
    ``imagesIR`` (the last such component if several; never a substring like ``my_images``)."""
    parts = list(PurePath(images_dir).parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "imagesIR"
            return Path(*parts)
    raise DatasetError(
        f"{images_dir}: no path component named 'images' to derive the IR folder from; "
        "set train_ir / val_ir in data.yaml"
    )


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
    if yaml_path.is_dir():
        return folder_spec(yaml_path)
    if not yaml_path.is_file():
        raise DatasetError(f"{yaml_path}: data file not found")
    try:
        spec = yaml.safe_load(yaml_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{yaml_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping with path, train, val, names")
    if spec.get("layout", "yolofuse") != "yolofuse":
        return _layout_spec(yaml_path, spec)
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
        raise DatasetError(
            f"{yaml_path}: names maps class ids to names ({{0: person}}), got the key {first!r}"
        ) from None
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
    test = split("test") if spec.get("test") else None
    test_ir = (split("test_ir") if "test_ir" in spec else ir_folder_for(test)) if test else None
    return DataSpec(
        yaml_path,
        root,
        train,
        val,
        train_ir,
        val_ir,
        names,
        _imgsz(yaml_path, spec),
        ir_scale=_ir_scale(yaml_path, spec),
        test=test,
        test_ir=test_ir,
    )


def _imgsz(yaml_path: Path, spec: dict) -> int | None:
    imgsz = spec.get("imgsz")
    if imgsz is not None and (isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0):
        raise DatasetError(f"{yaml_path}: imgsz must be a positive whole number of pixels, got {imgsz!r}")
    return imgsz


def _ir_scale(yaml_path: Path, spec: dict) -> str:
    rule = str(spec.get("ir_scale", "percentile"))
    if rule in IR_SCALES:
        return rule
    parts = rule.split(":")
    try:
        if parts[0] == "range" and len(parts) == 3 and float(parts[1]) < float(parts[2]):
            return rule
    except ValueError:
        pass
    raise DatasetError(f"{yaml_path}: ir_scale must be percentile, minmax or range:LO:HI, got {rule!r}")


def folder_spec(root: Path, layout: Layout | None = None) -> DataSpec:
    """A dataset folder as published (no data.yaml): its layout detected from the folder names."""
    if (root / "data.yaml").is_file() and layout is None:
        return load_data_spec(root / "data.yaml")
    layout = layout or detect_layout(root)
    if layout is None:
        raise DatasetError(
            f"{root}: not a dataset layout fuse-train knows (looked for "
            f"{'; '.join(' + '.join(x.markers) for x in LAYOUTS)}); pass a data.yaml"
        )
    if layout.name == "yolofuse":
        raise DatasetError(f"{root}: a YOLOFuse layout needs a data.yaml (names of the classes); see docs/datasets.md")
    spec = DataSpec(root, root, None, None, None, None, {}, None, layout=layout.name)
    spec.names = dict(spec.index().names)
    return spec


def _layout_spec(yaml_path: Path, spec: dict) -> DataSpec:
    """A data.yaml that points at a published layout: ``layout``, ``path``, optional ``names``, ``split_by``,
    ``val_fraction``, ``split_seed``, ``split_block``, ``imgsz``, ``ir_scale``."""
    layout = spec["layout"]
    if layout not in BY_NAME:
        raise DatasetError(f"{yaml_path}: unknown layout {layout!r}; known: {', '.join(BY_NAME)}")
    root = Path(spec.get("path") or ".").expanduser()
    root = (yaml_path.parent / root).resolve() if not root.is_absolute() else root
    names = spec.get("names") or {}
    names = dict(enumerate(names)) if isinstance(names, list) else {int(k): str(v) for k, v in names.items()}
    split_by = spec.get("split_by", "native")
    if split_by not in ("native", "sequence"):
        raise DatasetError(f"{yaml_path}: split_by must be native or sequence, got {split_by!r}")
    fraction = spec.get("val_fraction", 0.1)
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DatasetError(f"{yaml_path}: val_fraction must be between 0 and 1, got {fraction!r}")
    out = DataSpec(
        yaml_path,
        root,
        None,
        None,
        None,
        None,
        names,
        _imgsz(yaml_path, spec),
        layout=layout,
        split_by=split_by,
        val_fraction=float(fraction),
        split_seed=int(spec.get("split_seed", 0)),
        split_block=max(1, int(spec.get("split_block", 20))),
        ir_scale=_ir_scale(yaml_path, spec),
    )
    out.names = dict(out.index().names)
    return out


def parse_label_file(path: Path, nc: int) -> np.ndarray:
    """Rows of (cls, cx, cy, w, h); a missing file means no objects.  The first problem is a DatasetError
    naming file and line (``fuse-train data check`` lists them all)."""
    ann = parse_yolo(path, nc)
    if ann.problems:
        raise DatasetError(ann.problems[0])
    return np.array(ann.yolo_rows, np.float32).reshape(-1, 5)


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
        if not ir.exists():  # the same name first; else the same stem in another image format (a .png IR beside a .jpg)
            others = [ir_dir / (rgb.stem + s) for s in IMAGE_SUFFIXES + tuple(x.upper() for x in IMAGE_SUFFIXES)]
            ir = next((p for p in others if p.exists()), ir)
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
        raise DatasetError(
            f"{labels_dir}: no labels folder for {images_dir}; if every image really is background, "
            "create the empty folder"
        )
    return pairs, [labels_dir / (rgb.stem + ".txt") for rgb, _ in pairs]


def load_split(spec: DataSpec, split: str) -> SplitData:
    """The pairs and labels of ``split`` (train, val, or test where the data.yaml has one); the first defect
    is a DatasetError naming the file."""
    if spec.layout == "yolofuse":
        images, ir = {
            "train": (spec.train, spec.train_ir),
            "val": (spec.val, spec.val_ir),
            "test": (spec.test, spec.test_ir),
        }[split]
        if images is None:
            raise DatasetError(f"{spec.yaml_path}: no {split} split (add `{split}:` to the data.yaml)")
        pairs, label_files = split_files(images, ir)
        return SplitData(pairs, [parse_label_file(p, len(spec.names)) for p in label_files], label_files)
    index = spec.index()
    if split == "test":
        split = "val"  # a published test split is what fuse-train validates on (docs/datasets.md)
    samples = index.split(split)
    problems = list(index.problems)
    labels = []
    for sample in samples:
        rows, found = normalised_labels(sample)
        problems.extend(found)
        labels.append(np.array(rows, np.float32).reshape(-1, 5))
    if problems:
        raise DatasetError(
            f"{problems[0]} ({len(problems)} problem(s) in this {spec.layout} dataset; list them "
            f"with: fuse-train data check {spec.yaml_path})"
        )
    if not samples:
        hint = (
            f"; its frames form too few recordings for a split of runs of {spec.split_block} frames: set "
            "split_block (smaller) or val_fraction in a data.yaml with layout: (docs/datasets.md)"
            if split == "val" and (spec.split_by == "sequence" or index.layout.split == "none")
            else ""
        )
        raise DatasetError(f"{spec.root}: no {split} pairs in this {spec.layout} dataset{hint}")
    return SplitData(
        [(s.rgb, s.ir) for s in samples], labels, [s.label_file for s in samples if s.label_file is not None]
    )


def spec_fingerprint(spec: DataSpec) -> str:
    """``train:val`` fingerprints of a dataset, as recorded in fuse-train checkpoints (plus the 16-bit infrared
    rule when it is not the default, and the layout and split rule of a published layout)."""
    if spec.layout == "yolofuse":
        out = ":".join(
            dataset_fingerprint(*split_files(images, ir), spec.root)
            for images, ir in ((spec.train, spec.train_ir), (spec.val, spec.val_ir))
        )
    else:
        parts = []
        for split in ("train", "val"):
            data = load_split(spec, split)
            h = hashlib.sha256(
                f"{spec.layout}|{spec.split_by}|{spec.val_fraction}|{spec.split_seed}|{spec.split_block}\n".encode()
            )
            for rgb, ir in data.pairs:
                for p in (rgb, ir):
                    h.update(f"{_rel(p, spec.root)}|{p.stat().st_size}\n".encode())
            for label in dict.fromkeys(data.label_files):  # a COCO JSON is one file for every pair: hashed once
                h.update(f"{_rel(label, spec.root)}|".encode() + label.read_bytes() + b"\n")
            parts.append(h.hexdigest())
        out = ":".join(parts)
    return out if spec.ir_scale == "percentile" else f"{out}:ir_scale={spec.ir_scale}"


def spec_index(spec: DataSpec):
    """A DatasetIndex of any spec, problems collected rather than raised (for ``fuse-train data check``):
    a published layout's own index, or the YOLOFuse folders of a data.yaml read through the same templates."""
    if spec.layout != "yolofuse":
        return spec.index()
    base = BY_NAME["yolofuse"]
    samples, problems = [], []
    for split, images, ir in (
        ("train", spec.train, spec.train_ir),
        ("val", spec.val, spec.val_ir),
        ("test", spec.test, spec.test_ir),
    ):
        if images is None:
            continue
        labels = labels_folder_for(images)
        for folder, what in ((images, "image folder"), (ir, "IR image folder"), (labels, "labels folder")):
            if not folder.is_dir():
                problems.append(Problem("missing", str(folder), f"{what} of the {split} split not found"))
        root = Path(os.path.commonpath([images, ir, labels]))

        def rel(p: Path, root: Path = root) -> str:
            return p.relative_to(root).as_posix()

        layout = replace(
            base,
            rgb=f"{rel(images)}/{{id}}.{{ext}}",
            ir=f"{rel(ir)}/{{id}}.{{ext}}",
            labels=f"{rel(labels)}/{{id}}.txt",
            split="none",
        )
        part = index_dataset(root, layout, spec.names)
        for sample in part.samples:
            sample.split = split
        samples += part.samples
        problems += part.problems
    return DatasetIndex(spec.root, base, spec.names, samples, problems)
