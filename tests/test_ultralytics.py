"""Genuine Ultralytics (installed by the dev extra) on CPU: preflight of its checkpoints against RGB-only data,
remap of its device, and ckpttools.integrations.ultralytics (atomic saves under kill -9, digest, exact resume
with RNG states, preflight on resume, epochs extension).  Every run goes through fixtures/ultralytics_driver.py
in a process of its own (forked from a server that imported Ultralytics once), so Ultralytics' global settings
(deterministic algorithms, threads) stay out of this process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.forkserver import CompletedRun, ForkServer
from tests.helpers import read_through_driver

# ultralytics is in the dev extra, which .ci/run installs; it is never imported in this process (on import
# it patches PIL, which other tests then see)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "fixtures" / "ultralytics_driver.py"


_driver: dict[str, ForkServer] = {}


@pytest.fixture(scope="module", autouse=True)
def driver_server():
    """The module's Ultralytics runs are forked from one server that imported Ultralytics and torch once: 3.5 s
    of every start, 50 starts (tests/forkserver.py).  Each run is still a process of its own."""
    with ForkServer(
        {"PYTHONPATH": str(ROOT)},
        entry="ultralytics_driver:main",
        preload=["ultralytics_driver:preload"],
        path=[ROOT / "fixtures", ROOT],
    ) as server:
        _driver["server"] = server
        yield server
    del _driver["server"]


def drive(*args: str, env: dict | None = None, cwd: Path | None = None) -> CompletedRun:
    return _driver["server"].run(list(args), cwd or Path.cwd(), env=env, timeout=600)


def ckpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckpttools.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        timeout=300,
    )


def load(path: Path) -> dict:
    return read_through_driver(drive, path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("udata")
    assert drive("data", str(out / "ds")).returncode == 0
    return out / "ds" / "data.yaml"


@pytest.fixture(scope="module")
def cut_run(data, tmp_path_factory) -> Path:
    """A plain Ultralytics run stopped right after epoch 1's save (a resumable last.pt)."""
    project = tmp_path_factory.mktemp("uruns")
    proc = drive("train", str(data), str(project), "cut", "--cut", "0")
    assert proc.returncode == 0 and '"cut"' in proc.stdout, proc.stderr[-2000:]
    return project / "cut" / "weights" / "last.pt"


def test_genuine_checkpoint_verifies_and_preflight_reads_its_rgb_only_data(cut_run, data, tmp_path):
    assert ckpt("verify", str(cut_run)).returncode == 0  # a resumable genuine last.pt is never an error
    same = ckpt("preflight", str(cut_run), "--data", str(data))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "label cache Ultralytics wrote" in same.stdout
    changed = ckpt(
        "preflight",
        str(cut_run),
        "--batch",
        "8",
        "--lr0",
        "0.05",
        "--img-size",
        "96",
        "--model",
        "yolo11s.yaml",
        "--json",
    )
    assert changed.returncode == 3
    report = json.loads(changed.stdout)
    assert sorted(report["blocked"]) == ["batch", "img-size", "lr0", "model"]
    notes = {c["field"]: c["note"] for c in report["checks"]}
    assert "applies the new value" in notes["batch"] and "applies the new value" in notes["img-size"]
    assert "ignores it" in notes["lr0"] and "ignores it" in notes["model"]
    # the same data elsewhere: moved, not changed; then one label edited: blocked, even without --data
    moved = shutil.copytree(data.parent, tmp_path / "moved")
    (moved / "data.yaml").write_text((moved / "data.yaml").read_text().replace(str(data.parent), str(moved)))
    assert ckpt("preflight", str(cut_run), "--data", str(moved / "data.yaml")).returncode == 0
    other = shutil.copytree(data.parent, tmp_path / "other")  # another dataset: one image fewer
    (other / "images" / "train" / "0007.jpg").unlink()
    (other / "labels" / "train" / "0007.txt").unlink()
    (other / "data.yaml").write_text((other / "data.yaml").read_text().replace(str(data.parent), str(other)))
    switched = ckpt("preflight", str(cut_run), "--data", str(other / "data.yaml"), "--json")
    assert switched.returncode == 3
    check = next(c for c in json.loads(switched.stdout)["checks"] if c["field"] == "data")
    assert "different dataset" in check["note"] and "trains on the new data" in check["note"]
    label = data.parent / "labels" / "train" / "0001.txt"
    original = label.read_text()
    try:
        label.write_text(original + "0 0.5 0.5 0.2 0.2\n")
        edited = ckpt("preflight", str(cut_run), "--json")
        assert edited.returncode == 3
        check = next(c for c in json.loads(edited.stdout)["checks"] if c["field"] == "data")
        assert "content changed at the same path" in check["note"] and "without a word" in check["note"]
    finally:
        label.write_text(original)


def test_remap_device_lets_genuine_ultralytics_resume_on_cpu(cut_run, tmp_path):
    two_gpu = tmp_path / "two_gpu.pt"
    # as a two-GPU run records it; resume writes into tmp_path/run (not into the shared run)
    edited = drive("set-args", str(cut_run), str(two_gpu), "device=0,1", f"save_dir={tmp_path / 'run'}")
    assert edited.returncode == 0, edited.stderr[-2000:]
    refused = drive("resume", str(two_gpu))  # the problem: Ultralytics asks for the two GPUs again
    assert refused.returncode != 0 and "Invalid CUDA 'device=0,1'" in refused.stdout + refused.stderr
    one = tmp_path / "one.pt"
    assert ckpt("remap", str(two_gpu), "--gpus", "1", "-o", str(one)).returncode == 0
    assert load(one)["train_args"]["device"] == "0"
    cpu = tmp_path / "cpu.pt"
    proc = ckpt("remap", str(two_gpu), "--device", "cpu", "-o", str(cpu))
    assert proc.returncode == 0 and "'0,1' -> 'cpu'" in proc.stdout
    remapped = load(cpu)
    assert remapped["train_args"]["device"] == "cpu" and remapped["train_args"]["batch"] == 4
    assert remapped["ckpttools"]["history"][-1]["changes"] == {"train_args.device": ["0,1", "cpu"]}
    resumed = drive("resume", str(cpu))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming training" in resumed.stdout + resumed.stderr
    rows = list(csv.DictReader((tmp_path / "run" / "results.csv").read_text().splitlines()))
    assert int(float(rows[-1]["epoch"])) == 3  # trained to the end of the planned 3 epochs


def _losses(run: Path) -> list[list[float]]:
    return [
        [float(r[k]) for k in ("train/box_loss", "train/cls_loss", "train/dfl_loss")]
        for r in csv.DictReader(open(run / "results.csv"))
    ]


def _state(run: Path, read=load) -> dict:
    return read(run / "weights" / "last.resumable.pt")["ckpttools_state"]


def test_integration_resume_is_exact_where_plain_ultralytics_drifts(data, tmp_path):
    """nbs = batch, so no gradient accumulation window spans the save (see the README for the other case)."""
    runs = {}
    for label, safe in (("plain", []), ("safe", ["--safe"])):
        full = drive("train", str(data), str(tmp_path), f"{label}-full", "--epochs", "4", "--nbs", "4", *safe)
        cut = drive(
            "train", str(data), str(tmp_path), f"{label}-cut", "--epochs", "4", "--nbs", "4", "--cut", "1", *safe
        )
        assert full.returncode == 0 and cut.returncode == 0, full.stderr[-1500:] + cut.stderr[-1500:]
        resumed = drive("resume", str(tmp_path / f"{label}-cut" / "weights" / "last.pt"), *safe)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        runs[label] = (tmp_path / f"{label}-full", tmp_path / f"{label}-cut")
    full, cut = runs["safe"]
    assert _losses(full) == _losses(cut)  # every epoch's losses, as results.csv records them
    a, b = _state(full), _state(cut)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key  # bitwise
    assert b["rng"]["torch"].shape == a["rng"]["torch"].shape
    # the negative control: without the integration the resumed run leaves the uninterrupted one
    plain_full, plain_cut = runs["plain"]
    assert _losses(plain_full)[:2] == _losses(plain_cut)[:2] and _losses(plain_full)[2:] != _losses(plain_cut)[2:]


def test_integration_kills_during_saves_always_leave_a_loadable_last_pt(data, tmp_path):
    # the n-th passage of each point of the atomic write: the first save writes best.pt then last.pt (passages
    # 1 and 2); every point below falls in a later save (a previous last.pt exists) or in the final strip
    points = [
        "before-rename@3",
        "before-fsync@3",
        "after-rename@3",
        "keep-previous",
        "keep-previous@2",
        "before-fsync@4",
        "before-rename@4",
        "after-rename@4",
        "before-fsync@5",
        "before-rename@5",
    ]
    for i, point in enumerate(points):
        name = f"k{i}"
        proc = drive("train", str(data), str(tmp_path), name, "--epochs", "3", "--safe", env={"CKPTTOOLS_FAULT": point})
        assert proc.returncode == -9, (point, proc.returncode, proc.stderr[-1500:])
        last = tmp_path / name / "weights" / "last.pt"
        assert ckpt("verify", str(last)).returncode == 0, point  # 10 of 10: whole, verified
        assert load(last)["epoch"] >= -1
    # the last.pt a kill left behind resumes with genuine Ultralytics
    last = tmp_path / "k6" / "weights" / "last.pt"
    assert drive("resume", str(last), "--safe").returncode == 0


def test_integration_preflight_blocks_a_changed_resume_and_records_an_allowed_one(data, tmp_path):
    assert drive("train", str(data), str(tmp_path), "p", "--epochs", "3", "--cut", "0", "--safe").returncode == 0
    last = tmp_path / "p" / "weights" / "last.pt"
    blocked = drive("resume", str(last), "--safe", "--batch", "8")
    out = blocked.stdout + blocked.stderr
    assert blocked.returncode != 0 and "ResumeBlocked" in out
    assert "batch: 4 -> 8" in out and "applies the new value" in out
    allowed = drive("resume", str(last), "--safe", "--batch", "8", env={"CKPTTOOLS_ALLOW_CHANGE": "batch"})
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    history = load(tmp_path / "p" / "weights" / "last.resumable.pt")["ckpttools"]["history"]
    assert history[-1]["event"] == "resume" and history[-1]["allowed"] == {"batch": [4, 8]}


def test_finished_run_is_stripped_atomically_and_can_be_extended(data, tmp_path):
    from ckpttools.integrations.ultralytics import extend_epochs

    assert drive("train", str(data), str(tmp_path), "f", "--epochs", "2", "--safe").returncode == 0
    weights = tmp_path / "f" / "weights"
    for name in ("last.pt", "best.pt", "last.resumable.pt"):
        assert ckpt("verify", str(weights / name)).returncode == 0, name
    stripped = load(weights / "last.pt")
    assert stripped["optimizer"] is None and "ckpttools_state" not in stripped and "digest" in stripped
    assert drive("resume", str(weights / "last.pt")).returncode != 0  # plain Ultralytics: "nothing to resume"
    extended = extend_epochs(weights / "last.resumable.pt", 4)
    assert load(extended)["train_args"]["epochs"] == 4
    assert ckpt("verify", str(extended)).returncode == 0
    proc = drive("resume", str(extended), "--safe")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(_losses(tmp_path / "f")) == 4


def test_integration_records_yolofuse_infrared_partners_and_a_changed_one_blocks_the_resume(data, tmp_path):
    """Issue 27: a dataset in YOLOFuse's layout (imagesIR/ beside images/; Ultralytics trains on the RGB side,
    YOLOFuse's trainer reads both) trained through the integration: its checkpoint records the infrared
    partners' fingerprint, and an edited infrared image blocks the resume, named, in ckpt preflight (exit 3) and
    in the integration's own resume."""
    from PIL import Image

    ds = tmp_path / "ds"
    shutil.copytree(data.parent, ds)
    for image in (ds / "images").rglob("*.jpg"):
        partner = Path(str(image).replace("images", "imagesIR"))
        partner.parent.mkdir(parents=True, exist_ok=True)
        Image.open(image).convert("L").save(partner)
    yaml = ds / "data.yaml"
    yaml.write_text(yaml.read_text().replace(str(data.parent), str(ds)))
    assert drive("train", str(yaml), str(tmp_path), "fuse", "--epochs", "3", "--cut", "0", "--safe").returncode == 0
    last = tmp_path / "fuse" / "weights" / "last.pt"
    assert load(last)["ckpttools"]["data"]["infrared"]
    assert ckpt("preflight", str(last)).returncode == 0
    edited = next((ds / "imagesIR" / "train").iterdir())
    Image.open(edited).point(lambda v: 255 - v).save(edited)
    check = ckpt("preflight", str(last), "--json")
    assert check.returncode == 3 and "infrared images (imagesIR/) changed" in check.stdout
    resumed = drive("resume", str(last), "--safe")
    assert resumed.returncode != 0 and "infrared images (imagesIR/) changed" in resumed.stdout + resumed.stderr
