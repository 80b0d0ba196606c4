"""One error contract for every command (issue 26): what is not a checkpoint is exit 2 in every ckpt command,
with --json exactly one JSON object on stdout saying ``"ok": false``, and the message names the path given."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from ckpttools.cli import main as CKPT

NOT_CHECKPOINTS = {
    "empty": b"",
    "text": b"epoch,loss\n1,0.5\n",
    "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
    "random": bytes(range(256)) * 8,
}


def _commands(path: str, out: str) -> dict[str, list[str]]:
    return {
        "verify": ["verify", path],
        "inspect": ["inspect", path],
        "diff": ["diff", path, path],
        "convert": ["convert", path, out + ".h5"],
        "repair": ["repair", path, "-o", out + ".pt"],
        "remap": ["remap", path, "--device", "cpu", "-o", out + ".pt"],
        "preflight": ["preflight", path, "--batch", "8"],
        "audit": ["audit", path],
    }


@pytest.mark.parametrize("kind", sorted(NOT_CHECKPOINTS))
@pytest.mark.parametrize("command", sorted(_commands("x", "y")))
def test_not_a_checkpoint_is_exit_2_everywhere_with_one_json_object(tmp_path, monkeypatch, kind, command):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"given-{kind}.pt"
    path.write_bytes(NOT_CHECKPOINTS[kind])
    args = [*_commands(path.name, "out")[command], "--json"]
    result = CliRunner().invoke(CKPT, args, prog_name="ckpt", terminal_width=80)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    answer = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert answer["ok"] is False
    text = answer.get("error") or json.dumps(answer.get("findings"))
    assert path.name in text, text
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written beside it


def test_a_reader_that_goes_away_ends_the_command_quietly_with_141(tmp_path):
    # `ckpt verify x --all | head`: once head has its lines it closes the pipe; the rest of the output has
    # nowhere to go, which is no error of the checkpoint's (no "error: Broken pipe", no traceback)
    path = tmp_path / "nan.pt"
    torch.save({f"layer{i}.weight": torch.full((2,), float("nan")) for i in range(3000)}, path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpttools.cli", "verify", str(path), "--all"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert proc.stdout.read(200)  # the first lines arrive, then the reader is gone
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""
