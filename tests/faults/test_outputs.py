"""No output destroys an input, and no writer leaves a torn file or lasting garbage, whatever kills it.

Kills are injected at every rename and fsync point of every ``ckpt`` writer with the fault hook
(``CKPTTOOLS_FAULT=<point>``: the process sends itself SIGKILL there), not with sleeps."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckpttools.atomic import TEMPORARY, atomic_write
from ckpttools.cli import main as ckpt
from ckpttools.commands.verify import verify
from ckpttools.errors import UsageError


def _checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tree = {
        "model": {f"l{i}.weight": torch.randn(32, 16) for i in range(6)},
        "epoch": seed,
        "optimizer": {"state": {0: {"exp_avg": torch.randn(32, 16)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    }
    torch.save(tree, path)
    return path


def _sha(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(
            b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())
        ).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ckpt(args: list[str], fault: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env["CKPTTOOLS_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "ckpttools.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if TEMPORARY.match(p.name)]


# ---- --force never destroys what is not the output ---------------------------------------------------------------


def test_force_never_replaces_a_folder_that_holds_the_input(tmp_path):
    run = tmp_path / "exp"
    (run / "weights").mkdir(parents=True)
    last = _checkpoint(run / "weights" / "last.pt")
    (run / "results.csv").write_text("epoch\n1\n")
    before = {p: _sha(p) for p in run.rglob("*") if p.is_file()}
    res = CliRunner().invoke(ckpt, ["convert", str(last), str(run), "--to", "dcp", "--force"])
    assert res.exit_code == 2 and ("nothing in it is touched" in res.output or "holds the input" in res.output)
    assert {p: _sha(p) for p in run.rglob("*") if p.is_file()} == before  # every file is still there, unchanged
    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("keep me")
    res = CliRunner().invoke(ckpt, ["convert", str(last), str(other), "--to", "dcp", "--force"])
    assert res.exit_code == 2 and (other / "x.txt").read_text() == "keep me"
    res = CliRunner().invoke(ckpt, ["convert", str(last), str(other), "--force"])  # a file output onto a folder
    assert res.exit_code == 2 and (other / "x.txt").read_text() == "keep me"


def test_dcp_output_verifies_and_so_does_its_conversion_back_and_force_replaces_a_dcp_folder(tmp_path):
    from ckpttools.digest import digest_record

    src = tmp_path / "last.pt"
    tree = {
        "model": {"w": torch.randn(8, 4)},
        "scaler": {},
        "optimizer": {"state": {0: {"m": torch.ones(2)}}},
        "names": {0: "person"},
        "epoch": 3,
    }
    tree["digest"] = digest_record(tree)
    torch.save(tree, src)
    out = tmp_path / "d"
    assert CliRunner().invoke(ckpt, ["convert", str(src), str(out), "--to", "dcp"]).exit_code == 0
    assert not verify(out).errors
    back = tmp_path / "back.pt"
    assert CliRunner().invoke(ckpt, ["convert", str(out), str(back)]).exit_code == 0
    assert not verify(back).errors
    again = CliRunner().invoke(ckpt, ["convert", str(src), str(out), "--to", "dcp", "--force"])
    assert again.exit_code == 0 and not verify(out).errors and not _temporaries(tmp_path)


def test_an_output_that_appears_while_writing_is_not_replaced(tmp_path):
    out = tmp_path / "out.pt"
    with pytest.raises(UsageError, match="appeared while"), atomic_write(out, replace=False) as f:
        f.write(b"ours")
        out.write_bytes(b"someone else's")  # a concurrent writer finishes first
    assert out.read_bytes() == b"someone else's" and not _temporaries(tmp_path)


def test_non_regular_files_and_loops_are_refused_in_one_line(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    for path, needle in ((fifo, "not a regular file"), (loop, "cannot be read"), (Path("/dev/zero"), "not a regular")):
        for command in (["verify"], ["inspect"], ["repair", "-o", str(tmp_path / "r.pt")]):
            res = _ckpt([command[0], str(path), *command[1:]], timeout=30)
            assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, (command, res.stderr)
    res = _ckpt(["verify", "--json", str(tmp_path / "missing.pt")])
    assert res.returncode == 2 and '"exit_code": 2' in res.stdout  # --json says it too


# ---- kills at every rename / fsync point ----------------------------------------------------------------------

WRITERS = {
    "convert-pt": (lambda s, o: ["convert", str(s), str(o)], "out.pt"),
    "convert-h5": (lambda s, o: ["convert", str(s), str(o)], "out.h5"),
    "convert-safetensors": (lambda s, o: ["convert", str(s), str(o)], "out.safetensors"),
    "convert-dcp": (lambda s, o: ["convert", str(s), str(o), "--to", "dcp"], "out_dcp"),
    "remap": (lambda s, o: ["remap", str(s), "--device", "cpu", "-o", str(o)], "out.pt"),
    "repair": (lambda s, o: ["repair", str(s), "-o", str(o)], "out.pt"),
}
FILE_POINTS = ("before-fsync", "before-rename", "after-rename")
FOLDER_POINTS = ("folder-before-swap", "folder-after-swap")


def _cases():
    for name, (_, out) in WRITERS.items():
        for point in FOLDER_POINTS if out.endswith("_dcp") else FILE_POINTS:
            yield pytest.param(name, point, id=f"{name}-{point}")


@pytest.mark.slow  # one subprocess (with torch for DCP) per case
@pytest.mark.parametrize("writer,point", list(_cases()))
def test_a_kill_at_every_point_leaves_the_old_output_or_the_new_one_and_no_garbage(tmp_path, writer, point):
    args_of, out_name = WRITERS[writer]
    src = _checkpoint(tmp_path / "src.pt")
    out = tmp_path / out_name
    first = _ckpt(args_of(src, out))  # an existing output, to be replaced with --force
    assert first.returncode == 0, first.stderr
    old = _sha(out)
    _checkpoint(src, seed=1)  # new content, so old and new outputs differ
    killed = _ckpt([*args_of(src, out), "--force"], fault=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert out.exists() and _sha(out) in (old,) + (
        (_sha(out),) if point.startswith("after") or point.endswith("after-swap") else ()
    )
    assert not verify(out).errors, "a kill left a damaged output under the final name"
    if point in ("before-fsync", "before-rename", "folder-before-swap"):
        assert _sha(out) == old  # the kill came before the switch: the old output, whole
    again = _ckpt([*args_of(src, out), "--force"])  # the next run cleans what the killed one left
    assert again.returncode == 0, again.stderr
    assert not _temporaries(tmp_path) and not verify(out).errors


@pytest.mark.slow  # ten DCP conversions killed at random moments
def test_ten_random_kills_of_the_dcp_writer(tmp_path):
    src = _checkpoint(tmp_path / "src.pt")
    out = tmp_path / "out_dcp"
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckpttools.cli", "convert", str(src), str(out), "--to", "dcp", "--force"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.2, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            assert not verify(out).errors, f"kill {i}: torn DCP output"
    done = _ckpt(["convert", str(src), str(out), "--to", "dcp", "--force"])
    assert done.returncode == 0 and not verify(out).errors
    assert not _temporaries(tmp_path), _temporaries(tmp_path)


def test_a_full_disk_is_refused_up_front_by_every_writer(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): disk-full test needs root")
    try:
        src = _checkpoint(tmp_path / "src.pt")  # ~200 KB of tensors
        torch.save({"w": torch.randn(256, 512)}, src)  # 512 KB: more than the 300 KB the folder has
        for args in (
            ["convert", str(src), str(mount / "o.h5")],
            ["convert", str(src), str(mount / "o.pt")],
            ["convert", str(src), str(mount / "o.safetensors")],
            ["convert", str(src), str(mount / "od"), "--to", "dcp"],
            ["remap", str(src), "--device", "cpu", "-o", str(mount / "r.pt")],
            ["repair", str(src), "-o", str(mount / "p.pt")],
        ):
            res = _ckpt(args)
            assert res.returncode == 1 and "not enough space" in res.stderr, (args, res.stderr)
            assert len(res.stderr.strip().splitlines()) == 1 and not list(mount.iterdir())
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
