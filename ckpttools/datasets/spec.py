"""What a dataset argument names: a data.yaml (YOLOFuse layout, or ``layout:`` pointing at a published one) or a
dataset folder as published, resolved to a ``DataSpec`` with absolute paths, and its ``DatasetIndex``.

One YAML loader (``read_yaml_mapping``) and one rule for sibling folders (``twin_path``: the last path component
named exactly ``images`` becomes ``imagesIR`` or ``labels``) serve this module and ``ultralytics_data``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath

from ckpttools.datasets.index import DatasetIndex, Problem, detect_layout, index_dataset, layout_named
from ckpttools.datasets.layouts import BY_NAME, LAYOUTS, DatasetLayout

IR_SCALES = ("percentile", "minmax")  # and "range:LO:HI"; how 16-bit infrared becomes 8-bit (docs/datasets.md)
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and what is wrong."""


def read_yaml_mapping(path: Path, expected: str, error: type[ValueError] = DatasetError) -> dict:
    """The mapping a YAML file holds; anything else is ``error`` naming the file (``expected`` says what)."""
    import yaml  # here, not at the top: `ckpt verify` reaches this module through the trainers and reads no YAML

    try:
        value = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a mapping with {expected}")
    return value


def twin_path(path: PurePath, new: str) -> Path | None:
    """``path`` with its last component named exactly ``images`` replaced by ``new`` (never a substring such as
    ``my_images``); None when no component is named so."""
    parts = list(PurePath(path).parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = new
            return Path(*parts)
    return None


def ir_folder_for(images_dir: Path) -> Path:
    """The infrared twin of a YOLOFuse RGB folder (``images`` -> ``imagesIR``)."""
    twin = twin_path(images_dir, "imagesIR")
    if twin is None:
        raise DatasetError(
            f"{images_dir}: no path component named 'images' to derive the IR folder from; "
            "set train_ir / val_ir in data.yaml"
        )
    return twin


def labels_folder_for(images_dir: Path) -> Path:
    twin = twin_path(images_dir, "labels")
    if twin is None:
        raise DatasetError(f"{images_dir}: no path component named 'images' to derive the labels folder from")
    return twin


@dataclass
class DataSpec:
    """A parsed data.yaml (or a dataset folder of a known layout) with absolute paths.

    For the YOLOFuse layout ``train``/``val`` (and ``test``) are the RGB folders; for a published layout
    (``layout`` is not ``yolofuse``) the pairs come from the layout's templates and the split options below."""

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
    _index: DatasetIndex | None = field(default=None, repr=False, compare=False)
    _survey: object = field(default=None, repr=False, compare=False)  # datasets.survey.Survey, built once

    def index(self) -> DatasetIndex:
        """Every pair of every split and the problems met pairing them (built once)."""
        if self._index is None:
            self._index = _index_of(self)
        return self._index

    def folders(self) -> list[tuple[str, Path, Path]]:
        """(split, RGB folder, IR folder) of a YOLOFuse spec, for the splits it names."""
        given = zip(SPLITS, (self.train, self.val, self.test), (self.train_ir, self.val_ir, self.test_ir))
        return [(split, images, ir) for split, images, ir in given if images is not None and ir is not None]


def load_data_spec(data_yaml: str | os.PathLike) -> DataSpec:
    """Parse data.yaml (``path``, ``train``, ``val``, ``names``, optional ``train_ir``/``val_ir``/``imgsz``), or
    take a dataset folder as published.

    ``path`` is taken relative to the yaml's folder when relative; the split folders relative to ``path``."""
    yaml_path = Path(data_yaml).expanduser().resolve()
    if yaml_path.is_dir():
        return folder_spec(yaml_path)
    if not yaml_path.is_file():
        raise DatasetError(f"{yaml_path}: data file not found")
    spec = read_yaml_mapping(yaml_path, "path, train, val, names")
    if spec.get("layout", "yolofuse") != "yolofuse":
        return _layout_spec(yaml_path, spec)
    missing = [k for k in ("train", "val", "names") if k not in spec]
    if missing:
        raise DatasetError(f"{yaml_path}: missing key(s) {', '.join(missing)}")
    root = _root(yaml_path, spec)
    names = _names(yaml_path, spec["names"])

    def split(key: str) -> Path:
        value = spec[key]
        if not isinstance(value, str):
            raise DatasetError(f"{yaml_path}: {key} must be one folder path (a string)")
        return (root / value).resolve()

    train, val = split("train"), split("val")
    test = split("test") if spec.get("test") else None
    return DataSpec(
        yaml_path,
        root,
        train,
        val,
        split("train_ir") if "train_ir" in spec else ir_folder_for(train),
        split("val_ir") if "val_ir" in spec else ir_folder_for(val),
        names,
        _imgsz(yaml_path, spec),
        ir_scale=_ir_scale(yaml_path, spec),
        test=test,
        test_ir=(split("test_ir") if "test_ir" in spec else ir_folder_for(test)) if test else None,
    )


def _root(yaml_path: Path, spec: dict) -> Path:
    root = Path(spec.get("path") or ".").expanduser()
    return (yaml_path.parent / root).resolve() if not root.is_absolute() else root


def _names(yaml_path: Path, names) -> dict[int, str]:
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
    return names


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


def folder_spec(root: Path, layout: DatasetLayout | None = None) -> DataSpec:
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
    split_by = spec.get("split_by", "native")
    if split_by not in ("native", "sequence"):
        raise DatasetError(f"{yaml_path}: split_by must be native or sequence, got {split_by!r}")
    fraction = spec.get("val_fraction", 0.1)
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DatasetError(f"{yaml_path}: val_fraction must be between 0 and 1, got {fraction!r}")
    out = DataSpec(
        yaml_path,
        _root(yaml_path, spec),
        None,
        None,
        None,
        None,
        _names(yaml_path, spec["names"]) if spec.get("names") else {},
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


def _index_of(spec: DataSpec) -> DatasetIndex:
    """The one index of any spec: a published layout's templates, or a data.yaml's YOLOFuse folders read through
    the YOLOFuse row of the same table (its folders may be anywhere, so each split gets its own templates)."""
    if spec.layout != "yolofuse":
        return index_dataset(
            spec.root,
            layout_named(spec.layout),
            spec.names or None,
            spec.split_by,
            spec.val_fraction,
            spec.split_seed,
            spec.split_block,
        )
    base = BY_NAME["yolofuse"]
    samples, problems = [], []
    for split, images, ir in spec.folders():
        labels = labels_folder_for(images)
        absent = False
        for folder, message in (
            (images, f"image folder of the {split} split not found"),
            (ir, f"IR image folder of the {split} split not found (the infrared twin of {images})"),
            # a missing label *file* is an image without objects (the YOLO convention); a missing *folder* is
            # almost always a mistake that would train on zero objects without a word
            (labels, f"no labels folder for {images}; if every image really is background, create the empty folder"),
        ):
            if not folder.is_dir():
                problems.append(Problem("missing", str(folder), message))
                absent = True
        if absent:
            continue
        root = Path(os.path.commonpath([images, ir, labels]))
        layout = replace(
            base,
            rgb=f"{_relative(images, root)}{{id}}.{{ext}}",
            ir=f"{_relative(ir, root)}{{id}}.{{ext}}",
            labels=f"{_relative(labels, root)}{{id}}.txt",
            split="none",
        )
        part = index_dataset(root, layout, spec.names)
        for sample in part.samples:
            sample.split = split
        samples += part.samples
        problems += part.problems
    return DatasetIndex(spec.root, base, spec.names, samples, problems)


def _relative(folder: Path, root: Path) -> str:
    """``folder`` as a template prefix under ``root`` ("" when it is the root)."""
    rel = folder.relative_to(root).as_posix()
    return "" if rel == "." else f"{rel}/"
