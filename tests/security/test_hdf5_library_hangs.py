"""A damaged HDF5 file can hang libhdf5 itself: every command still answers, in bounded time, that it is damaged;
and damage h5py does notice (a failed metadata checksum) is a finding, never an internal error.

The file is what ``ckpt convert`` writes with one object header of its global heap (the collection that holds
variable-length strings, i.e. every string attribute) zeroed: libhdf5 reads it as free space of size 0 and
spins in ``H5HG__cache_heap_deserialize``, holding the GIL, for as long as it is left.  Found by mutating our
own converted files; the test first confirms plain h5py hangs on it, then that each command reports
``hdf5.unreadable`` (the metadata is read in a child stopped when it makes no progress,
``formats/watched_child.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpttools.commands.convert import convert
from ckpttools.errors import EXIT_PROBLEMS, CkptError

PROBE = {"CKPTTOOLS_CHILD_SILENCE_SECONDS": "2"}  # 30 s without progress by default; shortened for the test


@pytest.fixture(scope="module")
def heap_loop(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hdf5_hang")
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 3, "names": ["person", "car"]}, folder / "c.pt")
    convert(folder / "c.pt", folder / "c.h5")
    data = bytearray((folder / "c.h5").read_bytes())
    heap = data.find(b"GCOL")  # signature(4) version(1) reserved(3) size(8), then objects
    assert heap > 0, "no global heap: the converter no longer writes variable-length strings"
    first = heap + 16
    index, _, _, size = struct.unpack_from("<HHIQ", data, first)  # index, refcount, reserved, size, data
    assert index == 1
    second = first + 16 + (size + 7) // 8 * 8
    data[second : second + 16] = bytes(16)
    damaged = folder / "hang.h5"
    damaged.write_bytes(bytes(data))
    return damaged


WALK = """
import sys, h5py
def walk(group):
    for name in group.attrs:
        group.attrs[name]
    for name in group:
        if isinstance(group[name], h5py.Group):
            walk(group[name])
walk(h5py.File(sys.argv[1], "r"))
"""


def test_plain_h5py_hangs_on_it(heap_loop):
    """The premise: reading the attributes with h5py alone never returns (stopped after 4 s here)."""
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", WALK, str(heap_loop)], capture_output=True, timeout=4)


@pytest.mark.slow  # a process each, and 2 s of the child's silence
@pytest.mark.parametrize("args", [["verify"], ["inspect"], ["diff", "INTACT"], ["convert", "OUT"]], ids=lambda a: a[0])
def test_every_command_answers_that_it_is_damaged(heap_loop, tmp_path, args):
    intact = heap_loop.parent / "c.h5"
    argv = [a.replace("INTACT", str(intact)).replace("OUT", str(tmp_path / "out.pt")) for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "ckpttools.cli", argv[0], str(heap_loop), *argv[1:], "--json"],
        capture_output=True,
        text=True,
        timeout=120,  # the child is stopped after 2 s without progress; a hang would end here, as a failure
        env={**os.environ, **PROBE},
    )
    # verify and convert refuse with exit 1; inspect and diff describe what they could read (as for any damaged
    # file) and name the problem
    if argv[0] in ("verify", "convert"):
        assert done.returncode == EXIT_PROBLEMS, (done.stdout, done.stderr)
    assert "hdf5.unreadable" in done.stdout or "without progress" in done.stdout, done.stdout
    json.loads(done.stdout)  # one object, for a script
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.pt").exists()


def test_the_intact_file_verifies(heap_loop):
    from ckpttools.commands.verify import verify

    assert verify(heap_loop.parent / "c.h5").ok


def test_a_damaged_object_header_anywhere_is_a_finding_never_an_internal_error(heap_loop, tmp_path):
    """A byte flipped inside each object header in turn (v2 headers carry a checksum): h5py raises KeyError,
    RuntimeError or returns None for the link, depending on where; each is ``hdf5.unreadable`` in verify, a
    problem inspect names, and a refusal from convert."""
    from ckpttools.commands.inspect import inspect_checkpoint
    from ckpttools.commands.verify import verify
    from ckpttools.errors import DamagedInput

    data = (heap_loop.parent / "c.h5").read_bytes()
    headers = [i for i in range(len(data)) if data[i : i + 4] == b"OHDR"]
    assert len(headers) >= 3  # the root, the model group, its dataset
    for at in headers:
        damaged = bytearray(data)
        damaged[at + 10] ^= 0xFF
        path = tmp_path / f"ohdr{at}.h5"
        path.write_bytes(bytes(damaged))
        report = verify(path)
        assert [f.code for f in report.errors] == ["hdf5.unreadable"], (at, report.findings)
        assert inspect_checkpoint(path)["problems_while_reading"], at
        with pytest.raises(DamagedInput):
            convert(path, tmp_path / "out.pt")


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_any_damage_to_an_hdf5_checkpoint_is_a_report_never_an_exception(heap_loop, data):
    """Bytes flipped, zeroed or cut anywhere in a converted checkpoint: verify returns a report (never raises)
    and inspect returns a summary, each in bounded time (the child's silence limit, then reads of what the
    child read)."""
    from ckpttools.commands.inspect import inspect_checkpoint
    from ckpttools.commands.verify import verify

    original = (heap_loop.parent / "c.h5").read_bytes()
    damaged = bytearray(original)
    at = data.draw(st.integers(0, len(original) - 1))
    how = data.draw(st.sampled_from(["flip", "zero", "cut"]))
    if how == "flip":
        damaged[at] ^= data.draw(st.integers(1, 255))
    elif how == "zero":
        damaged[at : at + 64] = bytes(len(damaged[at : at + 64]))
    else:
        del damaged[at:]
    path = heap_loop.parent / "fuzzed.h5"
    path.write_bytes(bytes(damaged))
    os.environ.update(PROBE)  # a loop found is stopped in 2 s (hypothesis runs this many times)
    try:
        report = verify(path)
        assert isinstance(report.ok(), bool) and (report.ok() or report.errors)
        if path.read_bytes()[:8] == original[:8]:
            with contextlib.suppress(CkptError):  # a one-line refusal is an answer too
                inspect_checkpoint(path)
    finally:
        os.environ.pop("CKPTTOOLS_CHILD_SILENCE_SECONDS")
