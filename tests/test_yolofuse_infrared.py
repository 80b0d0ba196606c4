"""YOLOFuse's infrared side in the preflight (issue 27): YOLOFuse pairs images/... with imagesIR/..., which
Ultralytics' label cache does not list.  A checkpoint written through the integration records a fingerprint of
the infrared partners, and a changed infrared image blocks the resume naming it; for a plain checkpoint (no
record) the preflight says that infrared images are not compared, and why.  Checkpoints here are plain dicts in
Ultralytics' layout (train_args, model, epoch), saved with torch.save."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from ckpttools.cli import main as CKPT
from ckpttools.trainers.ultralytics_records import infrared_fingerprint_of


def _yolofuse_dataset(root):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for sub in ("images", "imagesIR", "labels"):
            (root / sub / split).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{i}.jpg"
            )
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / "imagesIR" / split / f"{i}.jpg")
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: person\n")
    return yaml


def _checkpoint(path, yaml, record: dict | None):
    tree = {"epoch": 3, "model": {"w": torch.zeros(2)}, "train_args": {"data": str(yaml), "batch": 4, "epochs": 10}}
    if record is not None:
        tree["ckpttools"] = {"history": [], "data": record}
    torch.save(tree, path)
    return path


def _preflight(path):
    result = CliRunner().invoke(CKPT, ["preflight", str(path), "--json"])
    return result.exit_code, json.loads(result.stdout)


def test_a_changed_infrared_image_blocks_a_recorded_run_and_a_plain_one_says_it_is_not_compared(tmp_path):
    yaml = _yolofuse_dataset(tmp_path / "ds")
    recorded = _checkpoint(tmp_path / "int.pt", yaml, {"infrared": infrared_fingerprint_of(str(yaml))})
    plain = _checkpoint(tmp_path / "plain.pt", yaml, None)
    code, report = _preflight(recorded)
    assert code == 0 and report["ok"], report
    code, report = _preflight(plain)
    data = next(c for c in report["checks"] if c["field"] == "data")
    assert code == 0 and "infrared images (imagesIR/, YOLOFuse) not compared" in data["note"]
    # one infrared image edited: the recorded run is blocked, named as infrared; the RGB side is unchanged
    ir = tmp_path / "ds" / "imagesIR" / "train" / "2.jpg"
    pixels = np.asarray(Image.open(ir)).copy()
    pixels[0, 0] ^= 0xFF
    Image.fromarray(pixels).save(ir)
    code, report = _preflight(recorded)
    data = next(c for c in report["checks"] if c["field"] == "data")
    assert code == 3 and report["blocked"] == ["data"] and "infrared images (imagesIR/) changed" in data["note"]
    # an infrared partner gone counts as a change too
    ir.unlink()
    assert _preflight(recorded)[0] == 3


def test_an_rgb_only_dataset_has_no_infrared_record_or_note(tmp_path):
    yaml = _yolofuse_dataset(tmp_path / "ds")
    import shutil

    shutil.rmtree(tmp_path / "ds" / "imagesIR")
    assert infrared_fingerprint_of(str(yaml)) is None
    code, report = _preflight(_checkpoint(tmp_path / "plain.pt", yaml, None))
    data = next(c for c in report["checks"] if c["field"] == "data")
    assert code == 0 and "infrared" not in (data.get("note") or "")
