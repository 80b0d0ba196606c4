"""One reading of a dataset: what ``fuse-train data check`` reports is what training refuses (or goes on with).

Defects are planted at random into a copy of the demo dataset (YOLOFuse layout) and into the published layouts'
generated copies; for every combination the first blocking problem ``data check`` lists is the error training
raises, with the same count, and a dataset with no blocking problem trains on exactly the pairs check counted.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import make_datasets as M  # noqa: E402

from ckpttools.datasets.spec import DatasetError, load_data_spec  # noqa: E402
from ckpttools.datasets.survey import load_split, spec_fingerprint  # noqa: E402
from fuse_train.cli import cli  # noqa: E402

DEFECTS = ("no-ir", "no-rgb", "unreadable", "bad-line", "bad-class", "ir-size", "no-val-labels")


def _copy(tiny_data: Path, dst: Path) -> Path:
    shutil.copytree(tiny_data.parent, dst)
    spec = yaml.safe_load((dst / "data.yaml").read_text())
    spec["path"] = str(dst)
    (dst / "data.yaml").write_text(yaml.safe_dump(spec))
    return dst / "data.yaml"


def _plant(root: Path, defect: str, pick: int) -> None:
    split = "train" if defect != "no-val-labels" else "val"
    images = sorted((root / "images" / split).iterdir())
    rgb = images[pick % len(images)]
    ir = root / "imagesIR" / split / rgb.name
    label = root / "labels" / split / f"{rgb.stem}.txt"
    if defect == "no-ir":
        ir.unlink(missing_ok=True)
    elif defect == "no-rgb":
        rgb.unlink()
    elif defect == "unreadable":
        (rgb if pick % 2 else ir).write_bytes(b"not an image")
    elif defect == "bad-line":
        with label.open("a") as f:
            f.write("0 0.5 0.5 0.1\n")
    elif defect == "bad-class":
        with label.open("a") as f:
            f.write("7 0.5 0.5 0.1 0.1\n")
    elif defect == "ir-size" and ir.exists():
        Image.fromarray(np.zeros((32, 48), np.uint8), "L").save(ir)
    elif defect == "no-val-labels":
        shutil.rmtree(root / "labels" / "val", ignore_errors=True)


def _check(data: Path) -> dict:
    result = CliRunner().invoke(cli, ["data", "check", str(data), "--json"])
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.output)


def _holds_together(data: Path) -> None:
    report = _check(data)
    blocking = [p for p in report["problems"] if p["blocks_training"]]
    spec = load_data_spec(data)
    if blocking:
        with pytest.raises(DatasetError) as err:
            load_split(spec, "train")
        assert str(err.value).startswith(blocking[0]["message"])
        assert f"({len(blocking)} problem{'' if len(blocking) == 1 else 's'} in this" in str(err.value)
    else:
        for split in ("train", "val"):
            assert len(load_split(spec, split).pairs) == report["pairs"][split]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(defects=st.lists(st.tuples(st.sampled_from(DEFECTS), st.integers(0, 15)), max_size=3))
def test_data_check_and_training_give_one_verdict_on_planted_defects(tiny_data, tmp_path_factory, defects):
    data = _copy(tiny_data, tmp_path_factory.mktemp("ds") / "d")
    for defect, pick in defects:
        _plant(data.parent, defect, pick)
    _holds_together(data)


@pytest.mark.parametrize("layout", ["llvip", "m3fd", "flir-aligned", "kaist-voc", "voc-pairs"])
def test_published_layouts_give_one_verdict_too(tmp_path, layout):
    clean = M.write_layout(tmp_path / "clean", layout)
    M.break_copy(clean, tmp_path / "broken", layout)
    _holds_together(tmp_path / "broken")
    _holds_together(clean)


def test_fingerprint_is_versioned_and_old_records_are_compared_in_their_version(tiny_data, tmp_path):
    data = _copy(tiny_data, tmp_path / "d")
    spec = load_data_spec(data)
    now = spec_fingerprint(spec)
    assert now.startswith("v2:") and len(now.split(":")) == 3
    # version 1 as checkpoints before the prefix recorded it, computed independently here from the files
    import hashlib

    def v1(split: str) -> str:
        h = hashlib.sha256()
        for rgb in sorted((data.parent / "images" / split).iterdir()):
            for p in (rgb, data.parent / "imagesIR" / split / rgb.name):
                h.update(f"{p.relative_to(data.parent).as_posix()}|{p.stat().st_size}\n".encode())
            label = data.parent / "labels" / split / f"{rgb.stem}.txt"
            h.update(f"{label.relative_to(data.parent).as_posix()}|".encode())
            h.update(label.read_bytes() if label.exists() else b"<none>")
            h.update(b"\n")
        return h.hexdigest()

    old = f"{v1('train')}:{v1('val')}"
    assert spec_fingerprint(spec, like=old) == old  # an old checkpoint of this dataset still matches
    assert spec_fingerprint(spec, like=now) == now
    moved = tmp_path / "moved"
    shutil.copytree(data.parent, moved)
    (moved / "data.yaml").write_text(yaml.safe_dump({**yaml.safe_load(data.read_text()), "path": str(moved)}))
    assert spec_fingerprint(load_data_spec(moved / "data.yaml")) == now  # location-independent
    label = next((moved / "labels" / "train").iterdir())
    label.write_text(label.read_text() + "0 0.5 0.5 0.2 0.2\n")
    changed = load_data_spec(moved / "data.yaml")
    assert spec_fingerprint(changed) != now and spec_fingerprint(changed, like=old) != old


def test_a_resume_and_the_preflight_compare_an_old_record_in_its_version(tiny_data, tmp_path):
    from ckpttools.trainers.fuse_train_records import RECORDS
    from fuse_train.config import RunConfig
    from fuse_train.launch.resume import requested_resolution

    data = _copy(tiny_data, tmp_path / "d")
    now = spec_fingerprint(load_data_spec(data))
    old = spec_fingerprint(load_data_spec(data), like="0" * 64 + ":" + "0" * 64)
    assert not old.startswith("v2:") and old != now
    for recorded in (old, now):
        record = RECORDS.requested_record({"data-fingerprint": recorded}, {"data": str(data)})
        assert record["data-fingerprint"] == recorded
        resolved = requested_resolution(RunConfig(data=str(data), img_size=64), 1, recorded)
        assert resolved.dataset_fingerprint == recorded
