"""End-to-end runs of fuse-train on tiny data (marked slow; CI runs them)."""

import csv
import shutil

import pytest
import torch
import yaml

from ckpttools.digest import tree_digest
from tests.helpers import TINY, load, run_train, training_state_differences

pytestmark = pytest.mark.slow


def test_run_folder_contents(reference_run):
    run, proc = reference_run
    weights = run / "weights"
    assert (weights / "last.pt").is_file() and (weights / "best.pt").is_file() and (weights / "epoch2.pt").is_file()
    assert not (weights / "epoch1.pt").exists() and not (weights / "epoch3.pt").exists()
    rows = list(csv.DictReader((run / "results.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert {
        "train/box_loss",
        "train/cls_loss",
        "metrics/precision",
        "metrics/recall",
        "metrics/mAP50",
        "metrics/mAP50-95",
        "lr",
    } <= rows[0].keys()
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["epochs"] == 3 and args["batch"] == 4 and args["resolved"]["img_size"] == 64
    assert "epoch 3/3" in proc.stdout and "done:" in proc.stdout


def test_checkpoint_content_is_weights_only_loadable_and_documented(reference_run):
    run, _ = reference_run
    ckpt = load(run / "weights" / "last.pt")  # weights_only=True
    assert ckpt["format"] == "fuse-train-checkpoint" and ckpt["format_version"] == 1
    for key in (
        "model",
        "ema",
        "updates",
        "optimizer",
        "epoch",
        "best_fitness",
        "train_args",
        "resolved",
        "model_config",
        "scheduler",
        "scaler",
        "progress",
        "rng",
        "history",
        "digest",
        "results",
    ):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and ckpt["progress"]["finished"] is True
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    assert ckpt["digest"]["value"] == tree_digest(ckpt)
    # the model rebuilds from the recorded config alone
    from fuse_train.detector.model import ModelConfig, build_model

    model = build_model(ModelConfig(**ckpt["model_config"]), ckpt["resolved"]["img_size"])
    model.load_state_dict(ckpt["ema"])


def test_docs_name_every_top_level_key(reference_run):
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "checkpoint-format.md").read_text()
    ckpt = load(reference_run[0] / "weights" / "last.pt")
    for key in ckpt:
        assert f"`{key}`" in doc, key


def test_same_seed_gives_bitwise_the_same_run_even_with_workers(reference_run, tiny_data, tmp_path):
    args = [a if a != "0" or i == 0 or TINY[i - 1] != "--workers" else "2" for i, a in enumerate(TINY)]
    proc = run_train(["--data", str(tiny_data), *args, "--save-period", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    a = load(reference_run[0] / "weights" / "last.pt")
    b = load(tmp_path / "runs" / "fuse" / "exp" / "weights" / "last.pt")
    assert training_state_differences(a, b) == []
    assert (reference_run[0] / "results.csv").read_text() == (tmp_path / "runs/fuse/exp/results.csv").read_text()


def test_fresh_run_never_overwrites_a_run_with_checkpoints(reference_run, tiny_data, tmp_path):
    src = reference_run[0]
    dst = tmp_path / "runs" / "fuse" / "exp"
    shutil.copytree(src, dst)
    before = (dst / "weights" / "last.pt").read_bytes()
    proc = run_train(["--data", str(tiny_data), *TINY, "--epochs", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (dst / "weights" / "last.pt").read_bytes() == before
    assert (tmp_path / "runs" / "fuse" / "exp2" / "weights" / "last.pt").exists()
    assert "left untouched" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/data.yaml"], "data file not found"),
        (["--img-size", "100"], "--img-size: must be a multiple of 32"),
        (["--device", "cuda:0"], "CUDA is not available"),
        (["--batch", "0"], "--batch: must be at least 1"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(tmp_path, tiny_data, args, message):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the message under test is for machines without it
    full = (["--data", str(tiny_data)] if "--data" not in args else []) + args
    proc = run_train(full, tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unreadable_image_inside_worker_is_one_line(tmp_path, tiny_data):
    root = tmp_path / "ds"
    shutil.copytree(tiny_data.parent, root)
    spec = yaml.safe_load((root / "data.yaml").read_text())
    spec["path"] = str(root)
    (root / "data.yaml").write_text(yaml.safe_dump(spec))
    good = (root / "images" / "train" / "00002.png").read_bytes()
    (root / "images" / "train" / "00001.png").write_bytes(good[:120])  # a valid header: fails only when decoded
    proc = run_train(["--data", str(root / "data.yaml"), *TINY, "--workers", "1"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "00001.png: unreadable image" in proc.stderr and "Traceback" not in proc.stderr


def test_help_and_version():
    from click.testing import CliRunner

    from fuse_train.cli import cli

    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for option in (
        "--data",
        "--fusion",
        "--scale",
        "--epochs",
        "--batch",
        "--img-size",
        "--lr0",
        "--lrf",
        "--momentum",
        "--weight-decay",
        "--optimizer",
        "--seed",
        "--device",
        "--workers",
        "--project",
        "--name",
        "--save-period",
        "--resume",
        "--allow-change",
        "Exit codes",
    ):
        assert option in result.output
    assert CliRunner().invoke(cli, ["--version"]).output.strip().endswith("0.1.0")
