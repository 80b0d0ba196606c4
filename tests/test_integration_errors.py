"""The Ultralytics integration when Ultralytics cannot be imported (issue 27): the registry's torchvision built
for another torch fails inside Ultralytics' imports with "operator torchvision::nms does not exist"; the
integration answers with one line saying so and what to install, not a chained traceback from inside Ultralytics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_broken_ultralytics_import_is_one_line_naming_torchvision(tmp_path):
    # a stand-in package that fails the way a mismatched torchvision makes Ultralytics fail on import
    package = tmp_path / "ultralytics"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    proc = subprocess.run(
        [sys.executable, "-c", "from ckpttools.integrations.ultralytics import SafeDetectionTrainer"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ckpttools.integrations.ultralytics.UltralyticsUnavailable: ckpttools: Ultralytics")
    assert (
        "operator torchvision::nms" in last
        and "install the torchvision release made for torch" in last
        and "download.pytorch.org" in last
    )
    assert "During handling" not in proc.stderr and "direct cause" not in proc.stderr  # not chained
