"""Every published attack technique in the corpus: live under the loader it targets, named by `ckpt verify`,
never run by any `ckpt` command, and refused by the commands that write.

Each case is first confirmed to create its marker file when loaded the way a victim would (plain pickle,
torch.load(weights_only=False), torch's DCP loader) in a subprocess; then every command runs on it in this
process, and the marker must not appear."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ckpttools.cli import main as ckpt
from tests.security.corpus import TRIGGER_SCRIPT, cases

CASES = cases()


def _param(case):
    # payloads aimed at torch's loaders need a torch import in the victim process (seconds each)
    marks = [pytest.mark.slow] if case.trigger in ("torch", "dcp") else []
    return pytest.param(case, id=case.name, marks=marks)


def test_the_corpus_is_large_and_each_case_distinct():
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


def _trigger(case, path, tmp_path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", TRIGGER_SCRIPT, case.trigger, str(path), str(tmp_path / "victim.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    return proc.stderr


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_live_payload_is_named_and_never_run(case, tmp_path):
    folder = tmp_path / "case"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    path = case.build(folder, marker)

    log = _trigger(case, path, tmp_path)
    assert marker.exists(), f"the payload did not run under its own loader ({case.trigger}): {log}"
    marker.unlink()

    runner = CliRunner()
    verify = runner.invoke(ckpt, ["verify", "--json", str(path)])
    assert verify.exit_code == 1, verify.output
    errors = [f for f in json.loads(verify.output)["findings"] if f["severity"] == "error"]
    named = [f for f in errors if f["code"] in ("safety.dangerous-reference", "zip.duplicate-name")]
    assert named and any(case.expect in f["message"] + f["where"] for f in named), errors
    for args in (["inspect", str(path)], ["diff", str(path), str(path)], ["verify", str(path)]):
        result = runner.invoke(ckpt, args)
        assert result.exit_code in (0, 1) and "Traceback" not in result.output, (args, result.output)
    for args in (
        ["convert", str(path), str(tmp_path / "out.pt")],
        ["convert", str(path), str(tmp_path / "out.h5")],
        ["remap", str(path), "--device", "cpu", "-o", str(tmp_path / "remapped.pt")],
        ["repair", str(path), "-o", str(tmp_path / "repaired.pt")],
    ):
        result = runner.invoke(ckpt, args)
        assert result.exit_code == 1, (args, result.output)
        assert "would run code" in result.output or "not repaired" in result.output, (args, result.output)
        assert not any(tmp_path.glob("out*")) and not (tmp_path / "remapped.pt").exists()
    assert not marker.exists(), "a ckpt command ran the payload"
