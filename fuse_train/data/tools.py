"""``fuse-train data check`` and ``fuse-train data import``: what is in a paired dataset, and a one-time import
of a published layout into the YOLOFuse layout (symlinks, labels converted, data.yaml written last).

Both read the dataset through ``ckpttools.datasets``: ``data check`` lists the problems of the survey training
refuses on (``datasets/survey.py``), so a dataset that checks clean trains, and the first blocking defect check
names is the one training stops on.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ckpttools.atomic import atomic_folder, check_new_output
from ckpttools.datasets.index import DatasetIndex, Problem, detect_layout, image_size, index_dataset, normalised_labels
from ckpttools.datasets.layouts import BY_NAME
from ckpttools.datasets.spec import DatasetError, load_data_spec
from ckpttools.datasets.survey import ADVISORY, survey
from ckpttools.errors import UsageError
from ckpttools.report import counted


@dataclass
class CheckReport:
    data: str
    layout: str
    names: dict[int, str]
    pairs: dict[str, int] = field(default_factory=dict)  # per split
    instances: dict[str, Counter] = field(default_factory=dict)  # per split: class name -> boxes
    sizes: dict[str, Counter] = field(default_factory=lambda: {"rgb": Counter(), "ir": Counter()})
    problems: list[Problem] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "data": self.data,
            "layout": self.layout,
            "names": self.names,
            "pairs": self.pairs,
            "instances": {k: dict(v) for k, v in self.instances.items()},
            "sizes": {m: {f"{w}x{h}": n for (w, h), n in c.items()} for m, c in self.sizes.items()},
            "problems": [
                {"kind": p.kind, "path": p.path, "message": str(p), "blocks_training": p.kind not in ADVISORY}
                for p in self.problems
            ],
        }


def check_dataset(data: str, progress=None) -> CheckReport:
    """Every pair's files and annotations: pairing, readability, labels, classes, sizes (the dataset survey
    training refuses on: ``ckpttools.datasets.survey``)."""
    spec = load_data_spec(data)  # a data.yaml, or a dataset folder (its layout detected)
    found = survey(spec, progress)
    index = found.index
    report = CheckReport(str(spec.yaml_path), spec.layout, dict(index.names), problems=list(found.problems))
    report.sizes = found.sizes
    for sample, rows in zip(index.samples, found.rows):
        report.pairs[sample.split] = report.pairs.get(sample.split, 0) + 1
        counts = report.instances.setdefault(sample.split, Counter())
        for row in rows:
            counts[index.names.get(int(row[0]), str(int(row[0])))] += 1
    return report


def render_check(report: CheckReport, console) -> None:
    from rich.table import Table

    console.print(
        f"{report.data}: {report.layout} layout, {sum(report.pairs.values())} pairs "
        f"({', '.join(f'{k} {v}' for k, v in sorted(report.pairs.items()))}), classes: "
        f"{', '.join(report.names.values())}",
        markup=False,
        highlight=False,
    )
    table = Table(title="instances per class", title_justify="left")
    splits = sorted(report.instances)
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    for name in report.names.values():
        table.add_row(name, *(str(report.instances[s].get(name, 0)) for s in splits))
    console.print(table)
    for modality in ("rgb", "ir"):
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in report.sizes[modality].most_common(4))
        more = len(report.sizes[modality]) - 4
        console.print(
            f"{'visible' if modality == 'rgb' else 'infrared'} image sizes: {common or '-'}"
            + (f", and {more} more" if more > 0 else ""),
            markup=False,
            highlight=False,
        )
    if not report.problems:
        console.print("no problems found", markup=False)
        return
    by_kind = Counter(p.kind for p in report.problems)
    goes_on = sum(p.kind in ADVISORY for p in report.problems)
    console.print(
        f"{counted(len(report.problems), 'problem')}: "
        + ", ".join(f"{k} {n}" for k, n in by_kind.most_common())
        + (f" ({goes_on} of them training goes on with)" if goes_on else ""),
        markup=False,
        highlight=False,
    )
    for problem in report.problems:
        console.print(f"  {problem.kind}: {problem}", markup=False, highlight=False, soft_wrap=True)


@dataclass
class ImportResult:
    data_yaml: Path
    pairs: dict[str, int]
    skipped: list[Problem]


def import_dataset(
    layout_name: str,
    src: str,
    out: str,
    copy: bool = False,
    split_by: str = "native",
    val_fraction: float = 0.1,
    seed: int = 0,
    block: int = 20,
    ir_scale: str = "percentile",
    force: bool = False,
) -> ImportResult:
    """Write ``src`` (a published layout) as a YOLOFuse dataset under ``out``: images/, imagesIR/ (symlinks to
    the originals, or copies with ``copy``), labels/ in YOLO text, data.yaml.  Pairs with a problem are left
    out and returned; ``out`` appears complete or not at all."""
    root = Path(src).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    if layout_name == "auto":
        layout = detect_layout(root)
        if layout is None:
            raise DatasetError(f"{root}: layout not recognised; name it ({', '.join(BY_NAME)})")
    elif layout_name not in BY_NAME:
        raise DatasetError(f"unknown layout {layout_name!r}; known: {', '.join(BY_NAME)}")
    else:
        layout = BY_NAME[layout_name]
    if layout.name == "yolofuse":
        raise DatasetError(f"{root}: already the YOLOFuse layout; train on its data.yaml directly")
    out_path = Path(out).expanduser().resolve()
    try:
        check_new_output(out_path, [root], force, folder=True)
    except UsageError as exc:
        raise DatasetError(str(exc)) from None
    index: DatasetIndex = index_dataset(root, layout, None, split_by, val_fraction, seed, block)
    bad_files = {p.path for p in index.problems}
    skipped = list(index.problems)
    pairs: Counter = Counter()
    with atomic_folder(out_path, replace=force) as tmp:
        for sample in index.samples:
            if sample.split in ("train", "val") and _import_pair(tmp, sample, bad_files, copy, skipped):
                pairs[sample.split] += 1
        if not pairs["train"] or not pairs["val"]:
            raise DatasetError(
                f"{root}: the import would have {pairs['train']} train and {pairs['val']} val pairs; "
                "both must be non-empty (see --split-by, --val-fraction, --block)"
            )
        spec = {
            "path": ".",
            "train": "images/train",
            "val": "images/val",
            "names": dict(index.names),
            "ir_scale": ir_scale,
            "imported_from": {
                "layout": layout.name,
                "path": str(root),
                "split_by": split_by,
                "val_fraction": val_fraction,
                "seed": seed,
                "block": block,
                "copied": copy,
            },
        }
        (tmp / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return ImportResult(out_path / "data.yaml", dict(pairs), skipped)


def _import_pair(tmp: Path, sample, bad_files: set[str], copy: bool, skipped: list[Problem]) -> bool:
    """Link (or copy) one pair into the YOLOFuse layout under ``tmp`` with its YOLO label; a pair with a problem
    is left out and added to ``skipped``."""
    if {str(sample.rgb), str(sample.ir), str(sample.label_file)} & bad_files:
        return False
    if any(isinstance(image_size(p), str) for p in (sample.rgb, sample.ir)):
        skipped.append(Problem("unreadable", str(sample.rgb), "pair left out: an image is unreadable"))
        return False
    rows, found = normalised_labels(sample)
    if found:
        skipped += found
        return False
    name = sample.key + sample.rgb.suffix.lower()
    ir_name = sample.key + sample.ir.suffix.lower()
    for sub, path, file_name in (("images", sample.rgb, name), ("imagesIR", sample.ir, ir_name)):
        dst = tmp / sub / sample.split / file_name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst) if copy else os.symlink(path, dst)
    label = tmp / "labels" / sample.split / f"{sample.key}.txt"
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_text("".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in rows))
    return True
