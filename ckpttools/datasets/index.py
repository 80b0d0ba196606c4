"""An index of a paired dataset: every visible/infrared pair with its boxes and split, and every problem found.

``index_dataset(root, layout)`` walks the files once, pairs them by the layout's templates, parses the
annotations and assigns splits.  It never raises for a defect in the data: each one is a ``Problem`` naming
the file, so ``data check`` can list them all and training can refuse with the first.
"""

from __future__ import annotations

import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ckpttools.datasets import annotations as A
from ckpttools.datasets.layouts import BY_NAME, LAYOUTS, DatasetLayout, template_regex

EDGE_TOLERANCE = 1.0  # pixels a box may pass the image edge (VOC's 1-based corners reach width / height)


@dataclass
class Problem:
    kind: str  # unpaired-rgb, unpaired-ir, unreadable, size-mismatch, label, class, outside
    path: str
    message: str

    def __str__(self) -> str:
        return self.message if self.message.startswith(self.path) else f"{self.path}: {self.message}"


@dataclass
class Sample:
    key: str  # unique name of the pair, e.g. set00_V000_I00000
    rgb: Path
    ir: Path
    label_file: Path | None
    split: str  # train | val
    group: str  # recording the frame belongs to (frames of one group share a split)
    boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)  # cls, x1 y1 x2 y2 px
    size: tuple[int, int] | None = None  # (w, h) of the annotated image
    yolo_rows: list[tuple] | None = None  # a YOLO label's rows as written (cls cx cy w h): trained on unchanged


@dataclass
class DatasetIndex:
    root: Path
    layout: DatasetLayout
    names: dict[int, str]
    samples: list[Sample]
    problems: list[Problem]

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]


def detect_layout(root: Path) -> DatasetLayout | None:
    """The first layout whose marker paths all exist under ``root`` (the table is ordered specific first)."""
    for layout in LAYOUTS:
        if all((root / m).exists() for m in layout.markers):
            return layout
    return None


def layout_named(name: str) -> DatasetLayout:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; known: {', '.join(BY_NAME)}") from None


def _walk(root: Path, template: str) -> list[str]:
    """Relative posix paths of the files under the template's fixed leading folder."""
    fixed = template.split("{", 1)[0].rsplit("/", 1)[0] if "{" in template else template.rsplit("/", 1)[0]
    start = root / fixed if fixed else root
    out = []
    for folder, dirs, files in os.walk(start, followlinks=True):
        dirs.sort()
        rel = Path(folder).relative_to(root).as_posix()
        out.extend(f"{rel}/{f}" if rel != "." else f for f in sorted(files))
    return out


def _match(root: Path, template: str) -> dict[tuple, tuple[str, dict]]:
    pattern = template_regex(template)
    found = {}
    for rel in _walk(root, template):
        m = pattern.match(rel)
        if m:
            fields = {k: v for k, v in m.groupdict().items() if k != "ext"}
            found[tuple(sorted(fields.items()))] = (rel, fields)
    return found


def index_dataset(
    root: str | os.PathLike,
    layout: DatasetLayout,
    names: dict[int, str] | None = None,
    split_by: str = "native",
    val_fraction: float = 0.1,
    seed: int = 0,
    block: int = 20,
) -> DatasetIndex:
    """Index ``root`` as ``layout``.  ``names`` fixes the classes (a data.yaml's); else the layout's list, else
    the names found.  ``split_by='sequence'`` (or a layout with no published split) draws a seeded split of
    whole recordings / runs of ``block`` consecutive frames with about ``val_fraction`` of the pairs in val."""
    root = Path(root).resolve()
    problems: list[Problem] = []
    rgb, ir = _match(root, layout.rgb), _match(root, layout.ir)
    for key in sorted(rgb.keys() - ir.keys()):
        problems.append(
            Problem(
                "unpaired-rgb",
                str(root / rgb[key][0]),
                f"no infrared partner (expected {_expected(root, layout.ir, rgb[key][1])})",
            )
        )
    for key in sorted(ir.keys() - rgb.keys()):
        problems.append(
            Problem(
                "unpaired-ir",
                str(root / ir[key][0]),
                f"no visible partner (expected {_expected(root, layout.rgb, ir[key][1])})",
            )
        )
    keys = sorted(rgb.keys() & ir.keys())

    parsed, found_names = _annotations(root, layout, [rgb[k][1] for k in keys], problems, names)
    if names is None:
        classes = layout.classes or tuple(sorted(found_names))
        names = dict(enumerate(classes))
    class_id = {v: k for k, v in names.items()}
    aliases, ignored = dict(layout.aliases), set(layout.ignored)

    samples = []
    for key in keys:
        rel, fields = rgb[key]
        label_file, ann = parsed[key]
        sample = Sample(
            _sample_key(fields),
            root / rel,
            root / ir[key][0],
            label_file,
            "",
            _group(layout, fields),
            size=ann.size if ann else None,
            yolo_rows=list(ann.yolo_rows) if ann and layout.label_format == "yolo" else None,
        )
        for box in ann.boxes if ann else []:
            name = aliases.get(box.name, box.name)
            if name in ignored or box.name in ignored:
                continue
            if layout.label_format == "yolo":
                sample.boxes.append((int(box.name), box.x1, box.y1, box.x2, box.y2))
            elif name not in class_id:
                problems.append(
                    Problem("class", str(label_file), f"class {box.name!r} is not one of {', '.join(names.values())}")
                )
            else:
                sample.boxes.append((class_id[name], box.x1, box.y1, box.x2, box.y2))
        samples.append(sample)
    _assign_splits(root, layout, samples, split_by, val_fraction, seed, block, problems)
    return DatasetIndex(root, layout, names, samples, problems)


def _expected(root: Path, template: str, fields: dict) -> str:
    return str(root / template.format(**fields, ext="*"))


def _sample_key(fields: dict) -> str:
    order = [k for k in ("split", "set", "seq", "id") if k in fields and k != "split"]
    return "_".join(fields[k] for k in order)


def _group(layout: DatasetLayout, fields: dict) -> str:
    if layout.group:
        return layout.group.format(**fields)
    return ""  # filled by _assign_splits from runs of frame numbers


def _annotations(
    root: Path, layout: DatasetLayout, field_list: list[dict], problems: list[Problem], names: dict[int, str] | None
):
    """{key: (label file, Annotation | None)} and the class names seen."""
    out, seen = {}, set()
    nc = len(names) if names else 0
    coco_cache: dict[Path, dict] = {}
    for fields in field_list:
        key = tuple(sorted(fields.items()))
        path = root / layout.labels.format(**fields)
        if layout.label_format == "coco":
            if path not in coco_cache:
                table, cat_names, file_problems = (
                    A.parse_coco(path) if path.exists() else ({}, [], [f"{path}: missing"])
                )
                problems.extend(Problem("label", str(path), p) for p in file_problems)
                seen.update(cat_names)
                coco_cache[path] = table
            ann = coco_cache[path].get(fields["id"])
            if ann is None and path.exists():
                problems.append(Problem("label", str(path), f"no entry for image {fields['id']}"))
        elif layout.label_format == "yolo":
            ann = A.parse_yolo(path, nc)
        elif not path.exists():
            problems.append(Problem("label", str(path), "annotation file missing"))
            ann = None
        else:
            ann = A.parse_voc(path) if layout.label_format == "voc" else A.parse_kaist_txt(path)
        if ann is not None:
            problems.extend(Problem("label", str(path), p) for p in ann.problems)
            seen.update(b.name for b in ann.boxes)
        out[key] = (path, ann)
    return out, seen


def _assign_splits(
    root: Path,
    layout: DatasetLayout,
    samples: list[Sample],
    split_by: str,
    val_fraction: float,
    seed: int,
    block: int,
    problems: list[Problem],
) -> None:
    rule = layout.split if split_by == "native" else "none"
    if rule == "folder":
        table = dict(layout.split_values)
        for s in samples:
            folder = Path(s.rgb).relative_to(root).parts[layout.rgb.split("/").index("{split}")]
            s.split = table.get(folder, "")
    elif rule == "set":
        table = dict(layout.split_values)
        for s in samples:
            s.split = table.get(s.key.split("_", 1)[0], "")
    elif rule == "list":
        member = {}
        for list_name, split in layout.split_values:
            path = root / list_name
            if not path.exists():
                problems.append(Problem("label", str(path), "split list missing"))
                continue
            for line in path.read_text(encoding="utf-8", errors="replace").split():
                entry = Path(line).stem if "/" in line else line
                for tail in layout.list_suffixes:
                    entry = entry[: -len(tail)] if entry.endswith(tail) else entry
                member[entry] = split
        for s in samples:
            s.split = member.get(s.key, "")
    else:
        _sequence_split(samples, val_fraction, seed, block)
    for s in samples:
        if not s.split:
            s.split = "unused"


def _sequence_split(samples: list[Sample], val_fraction: float, seed: int, block: int) -> None:
    """Whole groups go to one split: near-identical neighbouring frames never straddle train and val."""
    for s in samples:
        if not s.group:
            digits = re.findall(r"\d+", s.key)
            s.group = f"{s.key.rstrip('0123456789')}#{int(digits[-1]) // block}" if digits else s.key
    groups = sorted({s.group for s in samples})
    random.Random(seed).shuffle(groups)
    want, taken, val = val_fraction * len(samples), 0, set()
    sizes = defaultdict(int)
    for s in samples:
        sizes[s.group] += 1
    for g in groups:
        if taken >= want or len(val) + 1 >= len(groups):  # at least one group always trains
            break
        val.add(g)
        taken += sizes[g]
    for s in samples:
        s.split = "val" if s.group in val else "train"


def image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) from the header, or the reason it cannot be read."""
    from PIL import Image, UnidentifiedImageError  # here: `ckpt verify` reaches this module and opens no image

    try:
        with Image.open(path) as im:
            return im.size
    except Image.DecompressionBombError as exc:
        return f"refused: {exc}"
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return f"unreadable image ({exc.__class__.__name__})"


def normalised_labels(sample: Sample, nc_names: dict[int, str] | None = None) -> tuple[list[tuple], list[Problem]]:
    """The sample's boxes as YOLO rows (cls, cx, cy, w, h in [0, 1]) and the problems found on the way: a box
    more than EDGE_TOLERANCE pixels outside the image is a problem; one within it is clipped to the edge.
    A YOLO label's rows are returned as written (normalised already; Ultralytics trains on them unclipped)."""
    if sample.yolo_rows is not None:
        return list(sample.yolo_rows), []
    if sample.size == (1, 1):  # YOLO labels are normalised already
        w = h = 1.0
        tolerance = 0.0
    else:
        size = sample.size or image_size(sample.rgb)
        if isinstance(size, str):
            return [], [Problem("unreadable", str(sample.rgb), size)]
        w, h = size
        tolerance = EDGE_TOLERANCE
    rows, problems = [], []
    for cls, x1, y1, x2, y2 in sample.boxes:
        outside = x1 < -tolerance or y1 < -tolerance or x2 > w + tolerance or y2 > h + tolerance
        if outside and sample.size != (1, 1):
            where = str(sample.label_file or sample.rgb)
            problems.append(
                Problem(
                    "outside",
                    where,
                    f"box {x1:g},{y1:g},{x2:g},{y2:g} is outside the {w}x{h} image {sample.rgb.name}",
                )
            )
            continue
        x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
        y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            continue
        rows.append((cls, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h))
    return rows, problems
