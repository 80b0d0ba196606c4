"""The dataset layouts fuse-train reads, as data: where each modality's images and the annotations are, how a
visible frame finds its infrared partner, and how the published split is stated.

A template is a path relative to the dataset root with fields in braces: ``{id}`` a frame, ``{split}`` a split
folder, ``{set}``/``{seq}`` KAIST's set and sequence, ``{ext}`` any image suffix.  A visible and an infrared
file are partners when every field but ``{ext}`` is equal: pairing is a table of name patterns, not code.

    python -m ckpttools.datasets.layouts > docs/datasets.md   (a test checks the committed copy)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_FORMATS = ("voc", "coco", "kaist-txt", "yolo")
SPLIT_RULES = ("folder", "list", "set", "none")


@dataclass(frozen=True)
class DatasetLayout:
    name: str
    title: str
    rgb: str  # template of a visible image
    ir: str  # template of its infrared partner
    labels: str  # template of the annotation file of a pair (voc, kaist-txt, yolo) or the one file of all (coco)
    label_format: str
    split: str  # folder: the {split} field; list: list files; set: by {set}; none: no published split
    split_values: tuple[tuple[str, str], ...] = ()  # folder value / list file / set -> "train" or "val"
    list_suffixes: tuple[str, ...] = ()  # a list entry may name the frame with one of these tails
    group: str = ""  # template of the recording a frame belongs to; "" = runs of consecutive frame numbers
    classes: tuple[str, ...] | None = None  # the published class list; None = the names found, sorted
    aliases: tuple[tuple[str, str], ...] = ()  # annotation name -> class
    ignored: tuple[str, ...] = ()  # annotation names that are not objects to learn (KAIST's 'person?')
    markers: tuple[str, ...] = ()  # relative paths whose presence identifies the layout
    note: str = ""


def template_regex(template: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos : m.start()]))
        field = m.group(1)
        if field == "ext":
            out.append(r"(?P<ext>" + "|".join(s[1:] for s in IMAGE_SUFFIXES) + ")")
        elif field == "id":
            out.append(r"(?P<id>[^/]+?)")
        else:
            out.append(rf"(?P<{field}>[^/]+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z", re.IGNORECASE)


KAIST_SETS = tuple((f"set{i:02d}", "train" if i <= 5 else "val") for i in range(12))

LAYOUTS: tuple[DatasetLayout, ...] = (
    DatasetLayout(
        "llvip",
        "LLVIP, as released",
        "visible/{split}/{id}.{ext}",
        "infrared/{split}/{id}.{ext}",
        "Annotations/{id}.xml",
        "voc",
        "folder",
        (("train", "train"), ("test", "val")),
        classes=("person",),
        markers=("visible", "infrared", "Annotations"),
        note="no val split is published: `test` is validated on, as in the LLVIP paper",
    ),
    DatasetLayout(
        "m3fd",
        "M3FD detection",
        "Vis/{id}.{ext}",
        "Ir/{id}.{ext}",
        "Annotation/{id}.xml",
        "voc",
        "none",
        classes=("People", "Car", "Bus", "Motorcycle", "Lamp", "Truck"),
        markers=("Vis", "Ir", "Annotation"),
        note="no split is published: a seeded split of runs of consecutive frames",
    ),
    DatasetLayout(
        "flir-aligned",
        "FLIR ADAS, aligned pairs",
        "JPEGImages/{id}_RGB.{ext}",
        "JPEGImages/{id}_PreviewData.{ext}",
        "Annotations/{id}_PreviewData.xml",
        "voc",
        "list",
        (("align_train.txt", "train"), ("align_validation.txt", "val")),
        list_suffixes=("_PreviewData", "_RGB"),
        classes=("person", "car", "bicycle"),
        markers=("JPEGImages", "Annotations", "align_train.txt"),
        note="pair names differ per modality; the annotations are the thermal frame's",
    ),
    DatasetLayout(
        "kaist",
        "KAIST multispectral, original bbGt text",
        "images/{set}/{seq}/visible/{id}.{ext}",
        "images/{set}/{seq}/lwir/{id}.{ext}",
        "annotations/{set}/{seq}/{id}.txt",
        "kaist-txt",
        "set",
        KAIST_SETS,
        group="{set}/{seq}",
        classes=("person",),
        aliases=(("people", "person"), ("cyclist", "person")),
        ignored=("person?",),
        markers=("images", "annotations"),
        note="set00-05 train, set06-11 test (validated on); people and cyclist are persons, person? is skipped",
    ),
    DatasetLayout(
        "kaist-voc",
        "KAIST multispectral, VOC XML relabelling",
        "images/{set}/{seq}/visible/{id}.{ext}",
        "images/{set}/{seq}/lwir/{id}.{ext}",
        "annotations-xml-new/{set}/{seq}/{id}.xml",
        "voc",
        "set",
        KAIST_SETS,
        group="{set}/{seq}",
        classes=("person",),
        aliases=(("people", "person"), ("cyclist", "person")),
        ignored=("person?",),
        markers=("images", "annotations-xml-new"),
        note="as kaist, with the widely used XML annotations",
    ),
    DatasetLayout(
        "yolofuse",
        "YOLOFuse / LLVIP-YOLO (fuse-train's own)",
        "images/{split}/{id}.{ext}",
        "imagesIR/{split}/{id}.{ext}",
        "labels/{split}/{id}.txt",
        "yolo",
        "folder",
        (("train", "train"), ("val", "val")),
        markers=("images", "imagesIR"),
        note="classes come from data.yaml's names; a missing label file is an image without objects",
    ),
    DatasetLayout(
        "voc-pairs",
        "generic VOC pairs",
        "rgb/{id}.{ext}",
        "ir/{id}.{ext}",
        "Annotations/{id}.xml",
        "voc",
        "none",
        markers=("rgb", "ir", "Annotations"),
        note="classes are the names found, sorted",
    ),
    DatasetLayout(
        "coco-pairs",
        "generic COCO-JSON pairs",
        "rgb/{id}.{ext}",
        "ir/{id}.{ext}",
        "annotations.json",
        "coco",
        "none",
        markers=("rgb", "ir", "annotations.json"),
        note="images matched to JSON entries by file stem; classes in category-id order",
    ),
)
BY_NAME = {layout.name: layout for layout in LAYOUTS}


def markdown_table() -> str:
    rows = ["| layout | what | visible | infrared | annotations | split |", "|---|---|---|---|---|---|"]
    for x in LAYOUTS:
        split = {
            "folder": "by folder: " + ", ".join(f"`{a}`→{b}" for a, b in x.split_values),
            "list": "by list: " + ", ".join(f"`{a}`→{b}" for a, b in x.split_values),
            "set": "by set (`set00`-`05` train, `06`-`11` val)",
            "none": "none published",
        }[x.split]
        rows.append(f"| `{x.name}` | {x.title} | `{x.rgb}` | `{x.ir}` | `{x.labels}` ({x.label_format}) | {split} |")
    notes = "\n".join(
        f"- `{x.name}`: {x.note}" + (f"; classes: {', '.join(x.classes)}" if x.classes else "") for x in LAYOUTS
    )
    return (
        f"# Dataset layouts\n\nGenerated by `python -m ckpttools.datasets.layouts` from the table in "
        f"`ckpttools/datasets/layouts.py`.\n`{{ext}}` is any of {', '.join(IMAGE_SUFFIXES)}; a visible and an "
        "infrared file are partners when every other field is equal.\n\n" + "\n".join(rows) + "\n\n" + notes + "\n"
    )


if __name__ == "__main__":
    print(markdown_table(), end="")
