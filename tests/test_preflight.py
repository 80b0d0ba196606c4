"""The preflight rules, field by field."""

import pytest

from ckpttools.commands.preflight import UnknownField, parse_allow, preflight

BASE = {
    "data": "/d/data.yaml",
    "data-fingerprint": "abc",
    "batch": 16,
    "world-size": 1,
    "lr0": 0.01,
    "lrf": 0.01,
    "momentum": 0.937,
    "weight-decay": 0.0005,
    "optimizer": "SGD",
    "warmup-epochs": 3.0,
    "schedule": "cosine",
    "epochs": 50,
    "fusion": "mid",
    "scale": "n",
    "nc": 1,
    "img-size": 640,
    "model": "fp1",
}
CHANGED = {
    "batch": 32,
    "world-size": 2,
    "lr0": 0.02,
    "lrf": 0.1,
    "momentum": 0.9,
    "weight-decay": 0.001,
    "optimizer": "AdamW",
    "warmup-epochs": 1.0,
    "schedule": "linear",
    "epochs": 60,
    "fusion": "late",
    "scale": "s",
    "nc": 2,
    "img-size": 320,
    "model": "fp2",
}


def test_identical_records_pass():
    report = preflight(BASE, dict(BASE))
    assert report.ok and not report.allowed and all(c.status == "same" for c in report.checks)


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_every_field_blocks_and_is_allowed_by_its_flag(field):
    requested = dict(BASE, **{field: CHANGED[field]})
    blocked = preflight(BASE, requested)
    assert [c.field for c in blocked.blocked] == [field]
    assert blocked.allow_hint() == f"--allow-change {field}"
    allowed = preflight(BASE, requested, parse_allow(field.replace("-", "_")))
    assert allowed.ok and [c.field for c in allowed.allowed] == [field]


def test_data_content_changed_at_the_same_path_blocks():
    report = preflight(BASE, dict(BASE, **{"data-fingerprint": "xyz"}))
    assert [c.field for c in report.blocked] == ["data"] and "content changed" in report.blocked[0].note


def test_moved_identical_dataset_is_a_note():
    report = preflight(BASE, dict(BASE, data="/elsewhere/data.yaml"))
    assert report.ok and [c.status for c in report.checks if c.field == "data"] == ["note"]


def test_unknown_allow_field_is_refused():
    with pytest.raises(UnknownField, match="known: data, fraction, batch"):
        parse_allow("batch,colour")


def test_a_checkpoint_without_a_run_record_is_refused_naming_the_trainers_that_keep_one(tmp_path):
    """Only trainers whose rules read a run record are named (Lightning's are not: it keeps none we compare)."""
    import torch
    from click.testing import CliRunner

    from ckpttools.cli import main as ckpt

    path = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    result = CliRunner().invoke(ckpt, ["preflight", str(path), "--batch", "8"])
    assert result.exit_code == 2
    assert "preflight needs a checkpoint of fuse-train, YOLOFuse or Ultralytics)" in result.output, result.output
