"""The commands beside training: ``data check``, ``data import``, ``val``, ``predict``, ``export``.

Exit codes: 0 done (``data check``: clean), 1 ``data check`` found problems or the work failed, 2 bad option or
input (one line naming the file; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console

from ckpttools.errors import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE  # one table for both programs
from ckpttools.yolo_data import DatasetError
from fuse_train.config import ConfigError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
DEBUG = click.option("--debug", is_flag=True, help="Show tracebacks.")


def one_line(exc: BaseException) -> str:
    """The useful line of an error; a DataLoader worker wraps the original message in a traceback."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else exc.__class__.__name__


def _one_line_errors(func):
    """Bad input is one line on stderr and exit 2; anything unexpected one line and exit 1 (--debug: traceback)."""

    @functools.wraps(func)
    def wrapper(*args, debug: bool = False, **kwargs):
        from fuse_train.inference import InferenceError

        err = Console(stderr=True, soft_wrap=True)
        try:
            code = func(*args, **kwargs)
        except (DatasetError, InferenceError, ConfigError) as exc:
            code = _fail(one_line(exc), EXIT_USAGE, debug, kwargs.get("as_json", False), err)
        except Exception as exc:  # noqa: BLE001 - the top-level catch that turns failures into one line
            message = f"{exc.__class__.__name__}: {one_line(exc)} (run with --debug for the traceback)"
            code = _fail(message, EXIT_PROBLEMS, debug, kwargs.get("as_json", False), err)
        sys.exit(code or 0)

    return wrapper


def _fail(message: str, code: int, debug: bool, as_json: bool, err: Console) -> int:
    """One line on stderr; with --json also the one JSON object the README promises on stdout."""
    if debug:
        traceback.print_exc()
    if as_json:
        print(json.dumps({"ok": False, "error": message, "exit_code": code}, indent=1))
    err.print(f"fuse-train: error: {message}", markup=False, highlight=False)
    return code


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
@_one_line_errors
def data_check(data: str, as_json: bool) -> int:
    """Pairs, unpaired files, unreadable images, label problems, instances per class and image sizes of DATA
    (a data.yaml or a dataset folder)."""
    from fuse_train.data_tools import check_dataset, render_check

    report = check_dataset(data)
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        render_check(report, Console(soft_wrap=True))
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
@_one_line_errors
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
    from fuse_train.data_tools import import_dataset

    result = import_dataset(layout, src, out, copy, split_by, val_fraction, seed, block, ir_scale, force)
    console = Console(soft_wrap=True)
    for problem in result.skipped:
        console.print(f"left out: {problem}", markup=False, highlight=False)
    console.print(
        f"wrote {result.data_yaml}: "
        + ", ".join(f"{k} {v} pairs" for k, v in sorted(result.pairs.items()))
        + (
            f"; {len(result.skipped)} problem(s) left out (see `fuse-train data check {src}`)" if result.skipped else ""
        ),
        markup=False,
        highlight=False,
    )
    console.print(f"train with: fuse-train --data {result.data_yaml}", markup=False, highlight=False)
    return EXIT_OK


def _run_folder(weights: Path) -> Path:
    """<run> for a checkpoint under <run>/weights/, else the checkpoint's own folder."""
    weights = weights.resolve()
    return weights.parent.parent if weights.parent.name == "weights" else weights.parent


def output_options(default_name: str):
    """``--project`` / ``--name`` as in training (Ultralytics' names for every mode), ``--exist-ok``, and
    ``--out`` kept as the folder itself."""

    def decorate(fn):
        fn = click.option(
            "--exist-ok",
            is_flag=True,
            help=f"Write into PROJECT/NAME even when it holds an earlier result (default: a new {default_name}2, "
            f"{default_name}3, ...).",
        )(fn)
        fn = click.option(
            "--out",
            type=click.Path(file_okay=False),
            default=None,
            help="The output folder itself (instead of PROJECT/NAME; an earlier result in it is replaced).",
        )(fn)
        fn = click.option("--name", default=default_name, show_default=True, help="Output folder name.")(fn)
        return click.option(
            "--project", default=None, help="Folder holding the output folder [default: the checkpoint's run folder]."
        )(fn)

    return decorate


def output_folder(weights: str, project: str | None, name: str, out: str | None, exist_ok: bool) -> Path:
    """Where val / predict write: --out as given; else PROJECT/NAME, numbered on (NAME2, NAME3, ...) rather
    than writing over an earlier result, unless --exist-ok."""
    if out:
        return Path(out)
    base = Path(project) if project else _run_folder(Path(weights))
    folder, n = base / name, 1
    while not exist_ok and folder.exists() and any(folder.iterdir()):
        n += 1
        folder = base / f"{name}{n}"
    return folder


WEIGHTS = click.option(
    "--weights",
    "-w",
    required=True,
    type=click.Path(),
    help="A fuse-train checkpoint (best.pt, last.pt, or a best.dcp folder); it must pass `ckpt verify`.",
)
DEVICE = click.option("--device", default="", help="cpu or cuda:0 [default: cuda:0 when present, else cpu].")


@click.command(
    "val",
    context_settings=CONTEXT,
    epilog="""\b
Examples:
  fuse-train val -w runs/fuse/exp/weights/best.pt
  fuse-train val -w best.pt --data /data/LLVIP --split val --json""",
)
@WEIGHTS
@click.option("--data", default=None, help="Dataset [default: the one the checkpoint was trained on].")
@click.option(
    "--split",
    type=click.Choice(["train", "val", "test"]),
    default="val",
    show_default=True,
    help="test: a data.yaml's test split (a published test split is already fuse-train's val).",
)
@click.option(
    "--conf", type=click.FloatRange(0, 1), default=0.001, show_default=True, help="Confidence threshold for mAP."
)
@click.option("--iou", type=click.FloatRange(0, 1), default=0.7, show_default=True, help="NMS IoU threshold.")
@click.option("--batch", type=click.IntRange(1), default=16, show_default=True)
@DEVICE
@output_options("val")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@DEBUG
@_one_line_errors
def val(
    weights: str,
    data: str | None,
    split: str,
    conf: float,
    iou: float,
    batch: int,
    device: str,
    project: str | None,
    name: str,
    out: str | None,
    exist_ok: bool,
    as_json: bool,
) -> int:
    """Metrics per class (P, R, mAP50, mAP50-95) of a checkpoint, with plots (PR_curve.png, F1_curve.png,
    confusion_matrix.png) and metrics.json in PROJECT/NAME."""
    from rich.table import Table

    from ckpttools.atomic import atomic_write
    from fuse_train.data import PairedDataset, load_data_spec
    from fuse_train.inference import InferenceError, load_detector
    from fuse_train.metrics import confusion_matrix, evaluate_detections
    from fuse_train.runlog import plot_confusion, plot_curves
    from fuse_train.trainer import resolve_data_yaml

    det = load_detector(weights, device)
    source = data or ("demo" if det.cfg.data == "demo" else det.resolved.data_yaml)
    spec = load_data_spec(resolve_data_yaml(source))
    if len(spec.names) != len(det.names):
        raise InferenceError(
            f"{spec.yaml_path}: {len(spec.names)} classes, but {weights} was trained on "
            f"{len(det.names)} ({', '.join(det.names.values())})"
        )
    dataset = PairedDataset.from_spec(spec, split, det.img_size)
    preds, gts = det.detect(dataset, conf, iou, batch)
    metrics = evaluate_detections(preds, gts, len(det.names))
    folder = output_folder(weights, project, name, out, exist_ok)
    folder.mkdir(parents=True, exist_ok=True)
    plot_curves(metrics.curves, det.names, folder)
    plot_confusion(confusion_matrix(preds, gts, len(det.names)), det.names, folder / "confusion_matrix.png")
    instances = sum(len(g) for g in gts)
    result = {
        "weights": str(weights),
        "data": str(spec.yaml_path),
        "split": split,
        "images": len(dataset),
        "instances": instances,
        **metrics.as_dict(),
        "classes": [dict(row, name=det.names[row["class"]]) for row in metrics.per_class],
        "plots": str(folder),
    }
    with atomic_write(folder / "metrics.json", "w") as f:
        json.dump(result, f, indent=1)
    if as_json:
        print(json.dumps(result, indent=1))
        return EXIT_OK
    table = Table(title=f"{weights} on {split} ({len(dataset)} images)", title_justify="left")
    for col in ("class", "images", "instances", "P", "R", "mAP50", "mAP50-95"):
        table.add_column(col, justify="left" if col == "class" else "right")
    table.add_row(
        "all",
        str(len(dataset)),
        str(instances),
        f"{metrics.precision:.3f}",
        f"{metrics.recall:.3f}",
        f"{metrics.map50:.3f}",
        f"{metrics.map:.3f}",
    )
    for row in metrics.per_class:
        table.add_row(
            det.names[row["class"]],
            "",
            str(row["instances"]),
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['mAP50']:.3f}",
            f"{row['mAP50-95']:.3f}",
        )
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(f"plots and metrics.json in {folder}", markup=False, highlight=False)
    return EXIT_OK


@click.command(
    "predict",
    context_settings=CONTEXT,
    epilog="""\b
Examples:
  fuse-train predict -w best.pt --source day/rgb.jpg --source-ir day/ir.png
  fuse-train predict -w best.pt --source visible --source-ir infrared
\b
Writes NAME.jpg (visible | infrared, boxes on both), labels/NAME.txt
(cls cx cy w h conf) and predictions.json.  Video is not read: extract
frames first (e.g. ffmpeg -i in.mp4 frames/%05d.png).""",
)
@WEIGHTS
@click.option("--source", required=True, help="A visible image, or a folder of them.")
@click.option("--source-ir", required=True, help="Its infrared partner, or a folder of partners with the same names.")
@click.option("--conf", type=click.FloatRange(0, 1), default=0.25, show_default=True)
@click.option("--iou", type=click.FloatRange(0, 1), default=0.7, show_default=True)
@click.option("--ir-scale", default="percentile", show_default=True, help="16-bit infrared to 8-bit (see data import).")
@DEVICE
@output_options("predict")
@DEBUG
@_one_line_errors
def predict(
    weights: str,
    source: str,
    source_ir: str,
    conf: float,
    iou: float,
    ir_scale: str,
    device: str,
    project: str | None,
    name: str,
    out: str | None,
    exist_ok: bool,
) -> int:
    """Detect objects in RGB+IR pairs and draw them on both images."""
    from fuse_train.inference import load_detector, pair_sources, predict_pairs

    pairs = pair_sources(source, source_ir)
    det = load_detector(weights, device)
    folder = output_folder(weights, project, name, out, exist_ok)
    records = predict_pairs(det, pairs, folder, conf, iou, ir_scale)
    console = Console(soft_wrap=True)
    for record in records:
        console.print(f"{Path(record['rgb']).name}: {len(record['boxes'])} detection(s)", markup=False, highlight=False)
    console.print(f"images, labels/ and predictions.json in {folder}", markup=False, highlight=False)
    return EXIT_OK


@click.command(
    "export",
    context_settings=CONTEXT,
    epilog="""\b
Example:
  fuse-train export -w runs/fuse/exp/weights/best.pt   # -> best.onnx
\b
The ONNX model takes rgb [B,3,S,S] and ir [B,1,S,S] (float, 0..1,
letterboxed) and returns boxes [B,A,4] (xyxy pixels) and scores
[B,A,classes]; NMS is left to the caller.  It is checked with onnxruntime
on a demo pair against PyTorch before it is kept.""",
)
@WEIGHTS
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option(
    "--project", default=None, help="Write PROJECT/NAME/WEIGHTS_STEM.onnx [default: beside WEIGHTS, as Ultralytics]."
)
@click.option("--name", default=None, help="Folder under PROJECT [default: export].")
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="The output file itself [default: WEIGHTS with .onnx].",
)
@click.option("--opset", type=click.IntRange(18), default=18, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@DEBUG
@_one_line_errors
def export(
    weights: str, fmt: str, project: str | None, name: str | None, out: str | None, opset: int, force: bool
) -> int:
    """Export a checkpoint as a two-input (RGB, IR) ONNX model."""
    from ckpttools.atomic import check_new_output
    from ckpttools.errors import UsageError
    from fuse_train.inference import InferenceError, check_onnx, export_onnx, load_detector

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise InferenceError(
            f"export needs onnx and onnxruntime: pip install 'ckpttools[export]' ({exc.name} missing)"
        ) from None
    if out:
        target = Path(out)
    elif project or name:
        base = Path(project) if project else _run_folder(Path(weights))
        target = base / (name or "export") / Path(weights).with_suffix(".onnx").name
        target.parent.mkdir(parents=True, exist_ok=True)
    else:
        target = Path(weights).with_suffix(".onnx")
    try:
        check_new_output(target, [Path(weights)], force)
    except UsageError as exc:
        raise InferenceError(str(exc)) from None
    det = load_detector(weights, "cpu")
    export_onnx(det, target, opset)
    result = check_onnx(det, target)
    console = Console(soft_wrap=True)
    console.print(
        f"wrote {target} (opset {opset}, input {det.img_size}x{det.img_size}); onnxruntime vs torch on a "
        f"demo pair: max |diff| boxes {result['max_abs_diff_boxes']:.2e} px, scores "
        f"{result['max_abs_diff_scores']:.2e}; detections {result['detections_onnx']} vs "
        f"{result['detections_torch']}",
        markup=False,
        highlight=False,
    )
    if not result["same_detections"] or result["max_abs_diff_kept_boxes"] > 0.05:
        target.unlink()
        raise InferenceError(f"{target}: onnxruntime disagrees with PyTorch ({result}); removed")
    return EXIT_OK


def register(group: click.Group) -> None:
    for command in (data_group, val, predict, export):
        group.add_command(command)
