"""Annotation parsers: PASCAL VOC XML, COCO JSON, KAIST's bbGt text, YOLO text.

Each returns objects as ``Box(name, x1, y1, x2, y2)`` in pixels of the annotated image, the image size when
the file states one, and a list of problems (``file:line: what``) instead of raising: ``data check`` wants
every problem, training wants the first.  XML is parsed with the standard library's ElementTree, which
refuses external entities and DTDs are not fetched (it never opens other files or URLs).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Box:
    name: str  # class name as written in the annotation (a class id as text for YOLO)
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass
class Annotation:
    boxes: list[Box] = field(default_factory=list)
    size: tuple[int, int] | None = None  # (width, height) stated by the file, when it states one
    problems: list[str] = field(default_factory=list)
    yolo_rows: list[tuple[float, ...]] = field(default_factory=list)  # YOLO text: the rows as written


def parse_voc(path: Path) -> Annotation:
    """One PASCAL VOC XML file: ``<size><width>``/``<height>``, ``<object><name>`` + ``<bndbox>`` (1-based,
    inclusive pixel corners as VOC writes them; read as they are, like most converters)."""
    out = Annotation()
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        out.problems.append(f"{path}: malformed XML ({exc})")
        return out
    except OSError as exc:
        out.problems.append(f"{path}: unreadable ({exc.strerror or exc})")
        return out
    size = root.find("size")
    if size is not None:
        try:
            w, h = int(float(size.findtext("width", "0"))), int(float(size.findtext("height", "0")))
            out.size = (w, h) if w > 0 and h > 0 else None  # some writers put 0: read the image instead
        except ValueError:
            out.problems.append(f"{path}: <size> is not numeric")
    for i, obj in enumerate(root.iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        where = f"{path}: object {i}"
        if not name or box is None:
            out.problems.append(f"{where}: needs <name> and <bndbox>")
            continue
        try:
            coords = [float(box.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            out.problems.append(f"{where} ({name}): <bndbox> value is not a number")
            continue
        _add(out, where, name, *coords)
    return out


def parse_kaist_txt(path: Path) -> Annotation:
    """KAIST's original per-frame text (Piotr's bbGt v3): a ``% bbGt version=3`` header, then one object per
    line ``label left top width height occlusion ...`` in pixels."""
    out = Annotation()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        out.problems.append(f"{path}: unreadable ({exc.__class__.__name__})")
        return out
    if not lines or not lines[0].startswith("% bbGt"):
        out.problems.append(f"{path}:1: expected the '% bbGt version=3' header")
        return out
    for lineno, line in enumerate(lines[1:], 2):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) < 5:
            out.problems.append(f"{where}: expected 'label left top width height ...', got {line.strip()!r}")
            continue
        try:
            x, y, w, h = (float(v) for v in fields[1:5])
        except ValueError:
            out.problems.append(f"{where}: not a number in {line.strip()!r}")
            continue
        _add(out, where, fields[0], x, y, x + w, y + h)
    return out


def parse_yolo(path: Path, nc: int) -> Annotation:
    """YOLO text, ``cls cx cy w h`` normalised to [0, 1]; boxes come back normalised too (size (1, 1))."""
    out = Annotation(size=(1, 1))
    if not path.exists():
        return out  # no label file: an image without objects (the YOLO convention)
    if not path.is_file():
        out.problems.append(f"{path}: a label must be a text file, this is a folder or a device")
        return out
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        out.problems.append(f"{path}: not UTF-8 text (byte {exc.start}); labels are lines 'cls cx cy w h'")
        return out
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 5:
            out.problems.append(f"{where}: expected 5 fields 'cls cx cy w h', got {len(fields)}")
            continue
        try:
            cls, cx, cy, w, h = (float(v) for v in fields)
        except ValueError:
            out.problems.append(f"{where}: not a number in {line.strip()!r}")
            continue
        if cls != int(cls) or not 0 <= cls < nc:
            out.problems.append(f"{where}: class {fields[0]} is not an integer in 0..{nc - 1}")
            continue
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            out.problems.append(f"{where}: box values must be normalised to [0, 1], got {' '.join(fields[1:])}")
            continue
        if w <= 0 or h <= 0:
            out.problems.append(f"{where}: box width and height must be positive")
            continue
        out.boxes.append(Box(str(int(cls)), cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        out.yolo_rows.append((cls, cx, cy, w, h))
    return out


def parse_coco(path: Path) -> tuple[dict[str, Annotation], list[str], list[str]]:
    """A COCO detection JSON: ``{file stem: Annotation}`` (``bbox`` is ``[left, top, width, height]``), the
    category names in id order, and file-level problems."""
    problems: list[str] = []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, [], [f"{path}: not a readable COCO JSON ({exc.__class__.__name__}: {str(exc).splitlines()[0]})"]
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("images"), list)
        or not isinstance(doc.get("annotations"), list)
    ):
        return {}, [], [f"{path}: a COCO JSON needs 'images' and 'annotations' lists"]
    categories = {c.get("id"): str(c.get("name")) for c in doc.get("categories", []) if isinstance(c, dict)}
    by_id: dict = {}
    out: dict[str, Annotation] = {}
    for image in doc["images"]:
        try:
            stem = Path(str(image["file_name"])).stem
            by_id[image["id"]] = stem
            out[stem] = Annotation(size=(int(image["width"]), int(image["height"])))
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: image entry {str(image)[:60]} needs id, file_name, width, height")
    for i, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotation {ann.get('id', i) if isinstance(ann, dict) else i}"
        try:
            stem = by_id[ann["image_id"]]
            left, top, w, h = (float(v) for v in ann["bbox"])
            name = categories[ann["category_id"]]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{where}: needs image_id, category_id and bbox [x, y, w, h] that exist")
            continue
        _add(out[stem], where, name, left, top, left + w, top + h)
    names = [categories[k] for k in sorted(categories, key=lambda k: (str(type(k)), k))]
    return out, names, problems


def _add(out: Annotation, where: str, name: str, x1: float, y1: float, x2: float, y2: float) -> None:
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        out.problems.append(f"{where} ({name}): box is not finite")
    elif x2 <= x1 or y2 <= y1:
        out.problems.append(f"{where} ({name}): empty box {x1:g},{y1:g},{x2:g},{y2:g}")
    else:
        out.boxes.append(Box(name, x1, y1, x2, y2))
