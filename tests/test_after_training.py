"""The rest of a detector's life on real runs: training on every published layout, `ckpt preflight` on a folder
dataset, and `val`, `predict`, `export` on a trained checkpoint (rebuilt from the checkpoint alone)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import make_datasets as M  # noqa: E402

from ckpttools.datasets.spec import load_data_spec  # noqa: E402
from fuse_train.cli import cli  # noqa: E402
from fuse_train.data.pairs import PairedDataset  # noqa: E402
from fuse_train.inference import check_onnx, letterbox_pair, load_detector  # noqa: E402
from tests.helpers import load, run_train  # noqa: E402

pytestmark = pytest.mark.slow
QUICK = ["--epochs", "1", "--batch", "4", "--workers", "0", "--device", "cpu", "--img-size", "64"]


@pytest.mark.parametrize("layout", ["llvip", "m3fd", "flir-aligned", "kaist", "kaist-voc", "voc-pairs", "coco-pairs"])
def test_every_published_layout_trains_as_it_is(tmp_path, layout):
    M.write_layout(tmp_path, layout)
    proc = run_train(["--data", str(tmp_path / layout), *QUICK], tmp_path)
    assert proc.returncode == 0, proc.stderr
    ckpt = load(tmp_path / "runs" / "fuse" / "exp" / "weights" / "last.pt")
    assert ckpt["resolved"]["data_yaml"] == str(tmp_path / layout)
    assert ckpt["model_config"]["nc"] == len(M.BY_NAME_CLASSES.get(layout, ("person",)))


def test_imported_layout_trains_and_ckpt_preflight_fingerprints_a_folder_dataset(tmp_path):
    M.write_layout(tmp_path, "llvip")
    data = tmp_path / "llvip"
    proc = run_train(["--data", str(data), *QUICK], tmp_path)
    assert proc.returncode == 0, proc.stderr
    last = tmp_path / "runs" / "fuse" / "exp" / "weights" / "last.pt"
    ckpt_cli = [sys.executable, "-m", "ckpttools.cli", "preflight", str(last), "--data"]
    same = subprocess.run([*ckpt_cli, str(data)], capture_output=True, text=True)
    assert same.returncode == 0, same.stdout + same.stderr
    xml = data / "Annotations" / "010001.xml"
    xml.write_text(xml.read_text().replace("Unspecified", "Frontal", 1))  # an annotation edited
    changed = subprocess.run([*ckpt_cli, str(data)], capture_output=True, text=True)
    assert changed.returncode == 3 and "data" in changed.stdout, changed.stdout + changed.stderr
    out = tmp_path / "imported"
    assert CliRunner().invoke(cli, ["data", "import", "llvip", str(data), "-o", str(out)]).exit_code == 0
    proc = run_train(["--data", str(out / "data.yaml"), *QUICK, "--name", "imported"], tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def trained(reference_run):
    run_dir, _ = reference_run
    return run_dir / "weights" / "best.pt"


def test_val_reproduces_the_metrics_training_recorded(trained, tmp_path):
    result = CliRunner().invoke(cli, ["val", "-w", str(trained), "--json", "--out", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    recorded = load(trained)["train_metrics"]
    for key in ("precision", "recall", "mAP50", "mAP50-95"):
        assert abs(metrics[key] - recorded[key]) < 1e-9, key
    assert [c["name"] for c in metrics["classes"]] == ["person"] and metrics["classes"][0]["instances"] == metrics[
        "instances"
    ]
    for png in ("PR_curve.png", "F1_curve.png", "confusion_matrix.png"):
        assert (tmp_path / "v" / png).stat().st_size > 1000
    table = CliRunner().invoke(cli, ["val", "-w", str(trained), "--out", str(tmp_path / "v2")], env={"COLUMNS": "80"})
    assert "mAP50-95" in table.output and "person" in table.output


def test_predict_writes_images_labels_and_json_matching_the_model(trained, tiny_data, tmp_path):
    val_rgb, val_ir = tiny_data.parent / "images" / "val", tiny_data.parent / "imagesIR" / "val"
    out = tmp_path / "pred"
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            "-w",
            str(trained),
            "--source",
            str(val_rgb),
            "--source-ir",
            str(val_ir),
            "--conf",
            "0.01",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "predictions.json").read_text())
    names = sorted(p.stem for p in val_rgb.iterdir())
    assert [Path(r["rgb"]).stem for r in doc["images"]] == names
    for stem in names:
        assert (out / f"{stem}.jpg").stat().st_size > 0 and (out / "labels" / f"{stem}.txt").exists()
    # the same detections as the evaluation path (dataset loader, batched), images being 64 px (no rescale)
    det = load_detector(trained)
    spec = load_data_spec(tiny_data)
    preds, _ = det.detect(PairedDataset.from_spec(spec, "val", det.img_size), 0.01, 0.7)
    assert sum(len(r["boxes"]) for r in doc["images"]) > 0
    for record, pred in zip(doc["images"], preds):
        got = np.array([b["xyxy"] + [b["score"]] for b in record["boxes"]]).reshape(-1, 5)
        want = pred[:, :5].copy()
        want[:, :4] = want[:, :4].clip(0, 64)
        assert got.shape == want.shape
        # matched as sets: one image alone and a batch of images give scores equal to ~1e-7, so detections with
        # near-tied scores (an untrained model at conf 0.01 has many) may come out in another order
        unmatched = list(range(len(want)))
        for row in got:
            close = [
                j
                for j in unmatched
                if np.allclose(row[:4], want[j, :4], atol=0.01) and abs(row[4] - want[j, 4]) <= 1e-6
            ]
            assert close, f"predicted box {row} is not among the evaluation path's detections"
            unmatched.remove(close[0])
        lines = (out / "labels" / f"{Path(record['rgb']).stem}.txt").read_text().splitlines()
        assert len(lines) == len(got)


def test_export_onnx_matches_torch_in_onnxruntime(trained, tiny_data, tmp_path):
    import onnxruntime as ort

    weights = tmp_path / "best.pt"
    shutil.copy(trained, weights)
    result = CliRunner().invoke(cli, ["export", "-w", str(weights)])
    assert result.exit_code == 0, result.output
    onnx_path = weights.with_suffix(".onnx")
    det = load_detector(weights)
    import onnx

    # every dimension has a stated size or a chosen name (no exporter-generated names like Concatboxes_dim_1)
    graph = onnx.load(onnx_path).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.output}
    assert dims["boxes"][0] == dims["scores"][0] == "batch"
    assert dims["boxes"][2] == 4 and dims["scores"][2] == len(det.names) and dims["boxes"][1] == dims["scores"][1] > 0
    from fuse_train.data.pairs import read_image

    rgb = read_image(tiny_data.parent / "images" / "val" / "00000.png", "RGB")
    ir = read_image(tiny_data.parent / "imagesIR" / "val" / "00000.png", "L")
    x, _, _ = letterbox_pair(rgb, ir, det.img_size)
    boxes, scores = ort.InferenceSession(str(onnx_path)).run(
        None, {"rgb": x[None, :3].numpy(), "ir": x[None, 3:].numpy()}
    )
    with torch.no_grad():
        box_raw, cls_logits = det.model(x[None])
    from fuse_train.detector.model import decode_boxes

    anchors, strides = det.anchors()
    assert np.allclose(boxes[0], decode_boxes(box_raw, anchors, strides)[0].numpy(), atol=1e-3)
    assert np.allclose(scores[0], cls_logits.sigmoid()[0].numpy(), atol=1e-5)
    assert check_onnx(det, onnx_path, (rgb, ir))["same_detections"]
    again = CliRunner().invoke(cli, ["export", "-w", str(weights)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_val_predict_export_refuse_a_damaged_checkpoint(trained, tiny_data, tmp_path):
    damaged = tmp_path / "best.pt"
    data = bytearray(trained.read_bytes())
    import zipfile

    with zipfile.ZipFile(trained) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor record
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
    data[offset] ^= 0x10
    damaged.write_bytes(bytes(data))
    pair = [
        "--source",
        str(tiny_data.parent / "images" / "val"),
        "--source-ir",
        str(tiny_data.parent / "imagesIR" / "val"),
    ]
    for args in (["val"], ["predict", *pair, "--out", str(tmp_path / "p")], ["export"]):
        result = CliRunner().invoke(cli, [*args, "-w", str(damaged)])
        assert result.exit_code == 2, result.output
        assert "fails `ckpt verify`" in result.output and ("digest.mismatch" in result.output or "crc" in result.output)
        assert "Traceback" not in result.output


def test_a_blocked_preflight_names_what_differs_in_one_line(trained):
    """The one line on stderr names the fields and says how to allow them, in words that agree with the count."""
    ckpt_cli = [sys.executable, "-m", "ckpttools.cli", "preflight", str(trained)]
    one = subprocess.run([*ckpt_cli, "--batch", "64"], capture_output=True, text=True)
    two = subprocess.run([*ckpt_cli, "--batch", "64", "--lr0", "0.5"], capture_output=True, text=True)
    assert one.returncode == two.returncode == 3, one.stderr + two.stderr
    assert one.stderr.strip() == "ckpt preflight: blocked: batch differs; allow with --allow-change batch"
    assert two.stderr.strip() == "ckpt preflight: blocked: batch, lr0 differ; allow with --allow-change batch,lr0"
    # the table and the wrapped "unchanged: ..." list, piped at 80 columns: no line ends in spaces
    lines = subprocess.run(
        [*ckpt_cli, "--batch", "64"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"}
    ).stdout.splitlines()
    assert any(line.startswith("unchanged: ") for line in lines), lines
    assert all(line == line.rstrip() and len(line) <= 80 for line in lines), lines
