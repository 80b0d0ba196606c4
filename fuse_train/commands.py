"""The commands beside training: ``val``, ``predict``, ``export`` (and ``data``, from ``data/commands.py``).

Exit codes: 0 done (``data check``: clean), 1 ``data check`` found problems or the work failed, 2 bad option or
input (one line naming the file; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from ckpttools.errors import EXIT_OK
from ckpttools.report import counted
from fuse_train.command_errors import CONTEXT, DEBUG, one_line_errors
from fuse_train.data.commands import data_group
from fuse_train.failures import InferenceError


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
@one_line_errors
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
    from ckpttools.atomic import atomic_write
    from ckpttools.datasets.spec import load_data_spec
    from fuse_train.data.demo import resolve_data_yaml
    from fuse_train.data.pairs import PairedDataset
    from fuse_train.detector.metrics import confusion_matrix, evaluate_detections
    from fuse_train.inference import load_detector
    from fuse_train.training.runlog import plot_confusion, plot_curves

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
    console = Console(soft_wrap=True, emoji=False)
    console.print(_metrics_table(f"{weights} on {split} ({len(dataset)} images)", result, det.names))
    console.print(f"plots and metrics.json in {folder}", markup=False, highlight=False)
    return EXIT_OK


def _metrics_table(title: str, result: dict, names: dict[int, str]):
    """``val``'s table: all classes, then one row per class."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("class", "images", "instances", "P", "R", "mAP50", "mAP50-95"):
        table.add_column(col, justify="left" if col == "class" else "right")
    table.add_row(
        "all",
        str(result["images"]),
        str(result["instances"]),
        *(f"{result[k]:.3f}" for k in ("precision", "recall", "mAP50", "mAP50-95")),
    )
    for row in result["classes"]:
        table.add_row(
            names[row["class"]],
            "",
            str(row["instances"]),
            *(f"{row[k]:.3f}" for k in ("precision", "recall", "mAP50", "mAP50-95")),
        )
    return table


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
@one_line_errors
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
    console = Console(soft_wrap=True, emoji=False)
    for record in records:
        found = counted(len(record["boxes"]), "detection")
        console.print(f"{Path(record['rgb']).name}: {found}", markup=False, highlight=False)
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
@one_line_errors
def export(
    weights: str, fmt: str, project: str | None, name: str | None, out: str | None, opset: int, force: bool
) -> int:
    """Export a checkpoint as a two-input (RGB, IR) ONNX model."""
    from ckpttools.atomic import check_new_output
    from ckpttools.errors import UsageError
    from fuse_train.inference import check_onnx, export_onnx, load_detector

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
    console = Console(soft_wrap=True, emoji=False)
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
