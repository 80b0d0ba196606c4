"""``fuse-train data check`` and ``fuse-train data import`` (the work is in ``tools.py``).

Exit codes: 0 clean / done, 1 ``data check`` found problems or the work failed, 2 bad option or input.
"""

from __future__ import annotations

import json

import click
from rich.console import Console

from ckpttools.errors import EXIT_OK, EXIT_PROBLEMS
from ckpttools.report import counted
from fuse_train.command_errors import CONTEXT, DEBUG, one_line_errors


@click.group("data", context_settings=CONTEXT)
def data_group() -> None:
    """Check a dataset, or import a published layout once into the YOLOFuse layout."""


@data_group.command(
    "check",
    context_settings=CONTEXT,
    epilog="""\b
Examples:
  fuse-train data check /data/LLVIP      # layout detected from its folders
  fuse-train data check data.yaml --json
\b
Exit codes: 0 no problems, 1 problems found (each named), 2 not a dataset.""",
)
@click.argument("data")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@DEBUG
@one_line_errors
def data_check(data: str, as_json: bool) -> int:
    """Pairs, unpaired files, unreadable images, label problems, instances per class and image sizes of DATA
    (a data.yaml or a dataset folder)."""
    from fuse_train.data.tools import check_dataset, render_check

    report = check_dataset(data)
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        render_check(report, Console(soft_wrap=True, emoji=False))
    return EXIT_PROBLEMS if report.problems else EXIT_OK


@data_group.command(
    "import",
    context_settings=CONTEXT,
    epilog="""\b
Examples:
  fuse-train data import llvip /data/LLVIP -o /data/LLVIP-yolofuse
  fuse-train data import m3fd /data/M3FD -o m3fd-fuse --val-fraction 0.2
  fuse-train data import kaist /data/kaist-rgbt -o kaist-fuse
\b
KAIST: set00-05 train, set06-11 val.  Images are symlinked (copied with
--copy); labels are written as YOLO text; data.yaml last.  Pairs with a
problem are left out and listed.  Layouts: docs/datasets.md.""",
)
@click.argument("layout")
@click.argument("src", type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(), help="New folder for the YOLOFuse layout.")
@click.option("--copy", is_flag=True, help="Copy the images instead of symlinking them.")
@click.option(
    "--split-by",
    type=click.Choice(["native", "sequence"]),
    default="native",
    show_default=True,
    help="native: the dataset's published split (LLVIP folders, FLIR lists, KAIST sets); sequence: a seeded "
    "split of whole recordings / runs of --block consecutive frames (also used where none is published).",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.1,
    show_default=True,
    help="With a sequence split: about this share of the pairs in val.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sequence split.")
@click.option(
    "--block",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Frames per run when a recording is not named by the layout (consecutive frame numbers).",
)
@click.option(
    "--ir-scale",
    default="percentile",
    show_default=True,
    help="How 16-bit infrared becomes 8-bit: percentile (1st-99th of each frame), minmax, or range:LO:HI.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it is an empty folder.")
@DEBUG
@one_line_errors
def data_import(
    layout: str,
    src: str,
    out: str,
    copy: bool,
    split_by: str,
    val_fraction: float,
    seed: int,
    block: int,
    ir_scale: str,
    force: bool,
) -> int:
    """Write dataset SRC, in LAYOUT (llvip, m3fd, flir-aligned, kaist, kaist-voc, voc-pairs, coco-pairs, or
    auto), as a YOLOFuse dataset in OUT."""
    from fuse_train.data.tools import import_dataset

    result = import_dataset(layout, src, out, copy, split_by, val_fraction, seed, block, ir_scale, force)
    console = Console(soft_wrap=True, emoji=False)
    for problem in result.skipped:
        console.print(f"left out: {problem}", markup=False, highlight=False)
    console.print(
        f"wrote {result.data_yaml}: "
        + ", ".join(f"{k} {v} pairs" for k, v in sorted(result.pairs.items()))
        + (
            f"; {counted(len(result.skipped), 'problem')} left out (see `fuse-train data check {src}`)"
            if result.skipped
            else ""
        ),
        markup=False,
        highlight=False,
    )
    console.print(f"train with: fuse-train --data {result.data_yaml}", markup=False, highlight=False)
    return EXIT_OK
