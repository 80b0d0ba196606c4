"""Never execute: malicious pickles in every container must be named by verify, and must never run."""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from click.testing import CliRunner

from ckpttools.cli import main as ckpt


class _System:
    """Pickles as os.system(cmd): what an attacker ships."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class _Subprocess:
    def __init__(self, argv):
        self.argv = argv

    def __reduce__(self):
        return (subprocess.call, (self.argv,))


def _memo_stack_global(marker) -> bytes:
    """Protocol-4 pickle: the module name is memoized, then fetched through BINGET for STACK_GLOBAL."""
    cmd = f"touch {marker}".encode()
    return (
        b"\x80\x04"  # PROTO 4
        b"\x8c\x05posix\x94"  # SHORT_BINUNICODE 'posix', MEMOIZE -> memo[0]
        b"\x8c\x04junk\x94"  # another memo entry
        b"0"  # POP
        b"0"  # POP
        b"h\x00"  # BINGET 0 -> 'posix'
        b"\x8c\x06system\x93"  # SHORT_BINUNICODE 'system', STACK_GLOBAL
        b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85R."  # arg, TUPLE1, REDUCE, STOP
    )


def _payloads(tmp_path, marker):
    cmd = f"touch {marker}"
    out = {}
    out["plain-pickle-named-pt (os.system, protocol 2)"] = (pickle.dumps({"model": _System(cmd)}, protocol=2), "system")
    out["exec via STACK_GLOBAL (protocol 4)"] = (pickle.dumps(_Exec(f"open({str(marker)!r}, 'w')"), protocol=4), "exec")
    out["subprocess.call"] = (pickle.dumps([_Subprocess(["touch", str(marker)])], protocol=4), "subprocess")
    out["memo indirection"] = (_memo_stack_global(marker), "posix.system")
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _System(cmd)}, buf)
    out["inside torch.save zip"] = (buf.getvalue(), "system")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3), "hook": _System(cmd)}, buf, _use_new_zipfile_serialization=False)
    out["legacy torch format"] = (buf.getvalue(), "system")
    out["zip with wrong data.pkl CRC"] = (_zip_with_bad_crc(cmd), "system")
    return out


def _zip_with_bad_crc(cmd) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": _System(cmd)}, buf)
    data = bytearray(buf.getvalue())
    zf = zipfile.ZipFile(io.BytesIO(bytes(data)))
    info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
    # flip one bit of the recorded CRC in the central directory entry of data.pkl
    cd_name = info.filename.encode()
    at = data.rfind(b"PK\x01\x02" + data[data.rfind(cd_name) - 42 : data.rfind(cd_name) - 42 + 12][4:], 0)
    entry = data.rfind(cd_name) - 46
    assert data[entry : entry + 4] == b"PK\x01\x02", at
    data[entry + 16] ^= 0x01
    return bytes(data)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a checkpoint payload ran"


def test_payloads_are_live(tmp_path):
    """Sanity: the payloads really run under plain pickle, so the tests below would notice execution."""
    live = tmp_path / "LIVE"
    data, _ = _payloads(tmp_path, live)["plain-pickle-named-pt (os.system, protocol 2)"]
    subprocess.run(
        [sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"], input=data, check=False
    )
    assert live.exists()
    live.unlink()
    subprocess.run(
        [sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
        input=_memo_stack_global(live),
        check=False,
    )
    assert live.exists()


@pytest.mark.parametrize(
    "case",
    [
        "plain-pickle-named-pt (os.system, protocol 2)",
        "exec via STACK_GLOBAL (protocol 4)",
        "subprocess.call",
        "memo indirection",
        "inside torch.save zip",
        "legacy torch format",
        "zip with wrong data.pkl CRC",
    ],
)
def test_malicious_checkpoint_is_named_and_never_run(tmp_path, marker, case):
    data, reference = _payloads(tmp_path, marker)[case]
    path = tmp_path / "evil.pt"
    path.write_bytes(data)
    before = path.read_bytes()
    runner = CliRunner()
    result = runner.invoke(ckpt, ["verify", str(path)])
    assert result.exit_code == 1, result.output
    assert reference in result.output
    as_json = runner.invoke(ckpt, ["verify", "--json", str(path)])
    assert as_json.exit_code == 1
    report = json.loads(as_json.output)
    dangerous = [f for f in report["findings"] if f["code"] == "safety.dangerous-reference"]
    assert dangerous and all(f["severity"] == "error" for f in dangerous)
    assert any(reference in f["message"] for f in dangerous)
    assert runner.invoke(ckpt, ["inspect", str(path)]).exit_code == 0
    assert path.read_bytes() == before  # never modified
    if case == "zip with wrong data.pkl CRC":
        assert {"zip.crc-mismatch", "zip.header-mismatch"} & {f["code"] for f in report["findings"]}


def test_unknown_classes_become_inert_placeholders(tmp_path, marker):
    """A pickled class from a library that is not installed is described, not imported or run."""
    import types

    fake = types.ModuleType("ultralytics_fake_tasks")

    class DetectionModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def __setstate__(self, state):  # would run on torch.load; must not run under ckpt
            open(marker, "w").close()
            super().__setstate__(state)

    DetectionModel.__module__ = "ultralytics_fake_tasks"
    DetectionModel.__qualname__ = "DetectionModel"
    fake.DetectionModel = DetectionModel
    sys.modules["ultralytics_fake_tasks"] = fake
    try:
        path = tmp_path / "u.pt"
        torch.save(
            {
                "epoch": 3,
                "model": DetectionModel(),
                "ema": None,
                "train_args": {"batch": 16, "lr0": 0.01},
                "date": "2026",
            },
            path,
        )
    finally:
        del sys.modules["ultralytics_fake_tasks"]
    from ckpttools import verify

    report = verify(path)
    codes = {f.code for f in report.findings}
    assert "safety.code-reference" in codes and "safety.dangerous-reference" not in codes
    assert report.layout == "ultralytics" and report.facts["parameter_count"] == 4 * 3 * 3 * 3 + 4
    assert report.ok()
