"""The integration on Ultralytics 8.3 (issue 27), resuming exactly where plain 8.3 does not.  YOLOFuse ships a
fork of 8.3.74; the dev extra installs 8.4.  This test installs the genuine 8.3.74 wheel (and what 8.3 needs that
8.4 dropped: tqdm, pandas and its date libraries) into a cached folder from the package registry, then trains,
stops and resumes with ``SafeDetectionTrainer`` under it, in subprocesses whose PYTHONPATH puts that folder
first."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures import ultralytics83_site
from tests.helpers import read_through_driver
from tests.test_ultralytics import _losses, _state

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "fixtures" / "ultralytics_driver.py"
VERSION = ultralytics83_site.VERSION


@pytest.fixture(scope="module")
def site() -> Path:
    try:
        return ultralytics83_site.ensure_site()
    except RuntimeError as exc:
        pytest.fail(str(exc))


def drive(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(DRIVER), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900
    )


def test_safe_trainer_resumes_exactly_on_ultralytics_8_3(site, tmp_path):
    data = tmp_path / "ds"
    assert drive(site, "data", str(data), cwd=tmp_path).returncode == 0
    yaml = str(data / "data.yaml")
    common = ["--epochs", "3", "--nbs", "4", "--safe"]
    full = drive(site, "train", yaml, str(tmp_path), "full", *common, cwd=tmp_path)
    cut = drive(site, "train", yaml, str(tmp_path), "cut", *common, "--cut", "0", cwd=tmp_path)
    assert full.returncode == 0 and cut.returncode == 0, full.stderr[-2000:] + cut.stderr[-2000:]
    last = tmp_path / "cut" / "weights" / "last.pt"
    read = functools.partial(read_through_driver, functools.partial(drive, site, cwd=tmp_path))
    saved = read(last)
    assert saved["version"] == VERSION and "digest" in saved  # the genuine 8.3, through the integration
    resumed = drive(site, "resume", str(last), "--safe", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut")
    a, b = _state(tmp_path / "full", read), _state(tmp_path / "cut", read)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    # the negative control: plain 8.3 resumes the same cut and leaves the uninterrupted run (its mosaic closes
    # on resume, its image buffer and loader order start afresh)
    plain = drive(
        site, "train", yaml, str(tmp_path), "plain-cut", "--epochs", "3", "--nbs", "4", "--cut", "0", cwd=tmp_path
    )
    assert plain.returncode == 0, plain.stderr[-2000:]
    again = drive(site, "resume", str(tmp_path / "plain-cut" / "weights" / "last.pt"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _losses(tmp_path / "plain-cut")[1:] != _losses(tmp_path / "full")[1:]
    verify = subprocess.run(
        [sys.executable, "-m", "ckpttools.cli", "verify", str(last)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert verify.returncode == 0, verify.stdout
