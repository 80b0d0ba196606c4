"""Safetensors headers a hostile or broken writer produces (issue 25): each problem is one clear answer, never
a traceback, and never a silent guess (an unknown dtype used to be read as uint8, a duplicate name kept
whichever value the JSON reader kept)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckpttools.commands.verify import verify
from ckpttools.errors import CkptError, NotACheckpoint


def _write(path: Path, header_text: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header_text)) + header_text + data)
    return path


def test_a_genuine_file_is_clean(tmp_path):
    save_file({"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.float16)}, tmp_path / "ok.safetensors")
    assert not verify(tmp_path / "ok.safetensors").errors


def test_a_duplicate_name_is_an_error(tmp_path):
    entry = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    text = ('{"w":' + entry + ',"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}').encode()
    json.loads(text)  # what a plain JSON reader does: silently keeps one of them
    codes = [f.code for f in verify(_write(tmp_path / "dup.safetensors", text, bytes(16))).errors]
    assert "safetensors.duplicate-name" in codes


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]},  # unknown dtype (was read as uint8)
        {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},  # negative dimension
        {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},  # not a list
        {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},  # reversed offsets
        {"dtype": "F32", "shape": [2], "data_offsets": [0]},  # one offset
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 8]},  # a bool is no dimension
        "not an object",
    ],
)
def test_an_entry_that_is_no_tensor_description_is_an_error(tmp_path, entry):
    text = json.dumps({"w": entry}).encode()
    assert "safetensors.bad-entry" in [
        f.code for f in verify(_write(tmp_path / "bad.safetensors", text, bytes(8))).errors
    ]


@pytest.mark.parametrize(
    "header, data",
    [
        (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b""),  # header fine, data missing
        (b"\xff\xfe{}", b""),  # not UTF-8
    ],
)
def test_broken_files_are_answered_in_one_line(tmp_path, header, data):
    path = _write(tmp_path / "broken.safetensors", header, data)
    try:
        report = verify(path)
    except NotACheckpoint:
        return
    assert report.errors


def test_a_header_length_past_the_end_is_not_a_checkpoint(tmp_path):
    from click.testing import CliRunner

    from ckpttools.cli import main as ckpt

    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    result = CliRunner().invoke(ckpt, ["verify", str(path)])
    assert result.exit_code == 2 and "not a checkpoint" in result.output


ENTRY = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "X1", ""]),
            "shape": st.lists(st.integers(-2, 4), max_size=3),
            "data_offsets": st.lists(st.integers(-4, 64), min_size=0, max_size=3),
        }
    ),
    st.integers(),
    st.text(max_size=5),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), ENTRY), max_size=5), data_len=st.integers(0, 80))
def test_any_header_gets_an_answer_never_a_traceback(tmp_path, entries, data_len):
    """Property: whatever the header, verify returns a report or raises our one-line error; names that repeat
    are reported; an entry we cannot read as a tensor is reported."""
    text = "{" + ",".join(f"{json.dumps(name)}:{json.dumps(entry)}" for name, entry in entries) + "}"
    path = _write(tmp_path / "gen.safetensors", text.encode(), bytes(data_len))
    try:
        report = verify(path)
    except CkptError:
        return
    codes = [f.code for f in report.errors]
    names = [name for name, _ in entries]
    if len(names) != len(set(names)):
        assert "safetensors.duplicate-name" in codes
    if any(not isinstance(entry, dict) for _, entry in entries):
        assert "safetensors.bad-entry" in codes or "safetensors.duplicate-name" in codes
