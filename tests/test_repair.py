"""`ckpt repair` (issue 7): truncated zips salvaged, damaged tensors filled from a backup and reported, prefixes
stripped, digests rebuilt, the result always passes verify, inputs never touched."""

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

from ckpttools.cli import main as ckpt
from ckpttools.commands.diff import diff_checkpoints
from ckpttools.commands.repair import repair
from ckpttools.commands.verify import verify
from tests.helpers import load, training_state_differences

pytestmark = pytest.mark.slow  # uses the session's reference training run


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def last(reference_run):
    return reference_run[0] / "weights" / "last.pt"


def test_cut_central_directory_comes_back_identical(last, tmp_path):
    data = last.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: data.find(b"PK\x01\x02") + 7])  # the end records are gone, every record is intact
    assert verify(cut).errors
    before = _sha(cut)
    result = repair(cut, tmp_path / "fixed.pt")
    assert result.repaired and not result.lost
    assert _sha(cut) == before
    assert training_state_differences(load(last), load(tmp_path / "fixed.pt")) == []
    assert diff_checkpoints(last, tmp_path / "fixed.pt").verdict == "identical"


def _damage_one_tensor(last, out):
    data = bytearray(last.read_bytes())
    weight = load(last)["model"]["head.cls.0.2.weight"]
    at = bytes(data).find(weight.numpy().tobytes()[:64])
    assert at > 0
    data[at + 3] ^= 0x40
    out.write_bytes(bytes(data))


def test_damaged_tensor_is_reported_then_filled_from_a_backup(last, reference_run, tmp_path):
    bad = tmp_path / "bad.pt"
    _damage_one_tensor(last, bad)
    before = _sha(bad)
    result = repair(bad, tmp_path / "fixed.pt")
    assert not result.repaired and not (tmp_path / "fixed.pt").exists()  # refuses to write a file with holes
    assert result.lost == ["model/head.cls.0.2.weight (CRC32 mismatch)"]
    backup = reference_run[0] / "weights" / "epoch2.pt"
    result = repair(bad, tmp_path / "fixed.pt", from_=backup)
    assert result.repaired and result.filled == ["model/head.cls.0.2.weight"]
    assert _sha(bad) == before
    fixed = load(tmp_path / "fixed.pt")
    assert torch.equal(fixed["model"]["head.cls.0.2.weight"], load(backup)["model"]["head.cls.0.2.weight"])
    others = {k: v for k, v in fixed["model"].items() if k != "head.cls.0.2.weight"}
    original = load(last)["model"]  # loaded once, not once per key
    assert all(torch.equal(v, original[k]) for k, v in others.items())
    assert fixed["history"][-1]["event"] == "repair" and fixed["history"][-1]["tensors"] == [
        "model/head.cls.0.2.weight"
    ]
    assert not verify(tmp_path / "fixed.pt").errors


def test_prefixes_stripped_and_missing_digest_rebuilt(last, tmp_path):
    tree = load(last)
    tree["model"] = {"module." + k: v for k, v in tree["model"].items()}
    tree["ema"] = {"_orig_mod." + k: v for k, v in tree["ema"].items()}
    del tree["digest"]
    src = tmp_path / "ddp.pt"
    torch.save(tree, src)
    codes = {f.code for f in verify(src).findings}
    assert "digest.missing" in codes
    result = repair(src, tmp_path / "clean.pt")
    assert result.repaired
    clean = load(tmp_path / "clean.pt")
    assert training_state_differences(load(last), clean) == []
    assert clean["digest"]["value"] == load(last)["digest"]["value"]  # the digest of the original content
    assert any("prefixes stripped" in a for a in result.actions)


def test_lost_pickle_is_not_repairable_and_cli_says_why(last, tmp_path):
    data = bytearray(last.read_bytes())
    data[200] ^= 0xFF  # inside data.pkl
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    res = CliRunner().invoke(ckpt, ["repair", str(bad), "-o", str(tmp_path / "o.pt")])
    assert res.exit_code == 1 and "last.prev.pt" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.pt").exists()
    res = CliRunner().invoke(ckpt, ["repair", str(last), "-o", str(last)])
    assert res.exit_code == 2 and "is the input" in res.output
    res = CliRunner().invoke(ckpt, ["repair", str(last), "-o", str(tmp_path / "ok.pt"), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["repaired"] is True


def _directory_span(data: bytes) -> tuple[int, int]:
    import struct

    eocd = data.rfind(b"PK\x05\x06")
    size, offset = struct.unpack_from("<II", data, eocd + 12)
    z64 = data.rfind(b"PK\x06\x06")
    if offset == 0xFFFFFFFF or (z64 >= 0 and z64 < eocd):
        size, offset = struct.unpack_from("<QQ", data, z64 + 40)
    return offset, size


def test_a_zeroed_directory_page_or_wrong_counts_come_back_bit_for_bit(last, tmp_path):
    """Issue 25: a 4 kB page of the central directory zeroed (every record intact) was judged by a pickle read
    from the wrong bytes; wrong entry counts likewise.  The directory is rebuilt from the local headers."""
    import struct

    from hypothesis import given, settings
    from hypothesis import strategies as st

    data = last.read_bytes()
    offset, size = _directory_span(data)
    assert size > 200  # a directory to damage

    def check(damaged: bytes, name: str) -> None:
        path, out = tmp_path / f"{name}.pt", tmp_path / f"{name}.fixed.pt"
        path.write_bytes(damaged)
        out.unlink(missing_ok=True)
        assert verify(path).errors
        result = repair(path, out)
        assert result.repaired and out.read_bytes() == data, result.actions + result.problems
        assert path.read_bytes() == damaged  # the input is never touched

    @settings(max_examples=15, deadline=None)
    @given(st.integers(0, size - 1), st.sampled_from([512, 4096]))
    def zeroed(start, length):
        page = offset + start - (offset + start) % length  # page-aligned, as a storage fault zeroes it
        end = min(page + length, offset + size)  # the end records stay whole (they say where things are)
        damaged = bytearray(data)
        damaged[max(page, offset) : end] = bytes(end - max(page, offset))
        if bytes(damaged) != data:
            check(bytes(damaged), "zeroed")

    zeroed()
    eocd = data.rfind(b"PK\x05\x06")
    wrong = bytearray(data)
    wrong[eocd + 8 : eocd + 12] = struct.pack("<HH", 3, 3)
    z64 = data.rfind(b"PK\x06\x06")
    if 0 <= z64 < eocd:
        wrong[z64 + 24 : z64 + 40] = struct.pack("<QQ", 3, 3)
    check(bytes(wrong), "counts")


def test_an_intact_file_is_copied_byte_for_byte_and_judged_on_its_one_reading(tmp_path):
    state = {f"w{i}": torch.randn(3) for i in range(50)}
    torch.save(state, tmp_path / "in.pt")
    result = repair(tmp_path / "in.pt", tmp_path / "out.pt")
    assert result.repaired and result.actions == ["nothing needed mending: OUT is a verified copy"]
    assert (tmp_path / "out.pt").read_bytes() == (tmp_path / "in.pt").read_bytes()
    # with a NaN, the same file no longer passes verify: no blind copy, the rewrite's verify refuses it
    state["w3"][1] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    result = repair(tmp_path / "nan.pt", tmp_path / "nan-out.pt")
    assert not result.repaired and "values.nonfinite" in " ".join(result.problems)
    assert not (tmp_path / "nan-out.pt").exists()


def test_an_input_replaced_after_it_was_checked_is_not_copied(tmp_path):
    from ckpttools.commands.repair import _copy_intact
    from ckpttools.commands.verify import file_identity
    from ckpttools.formats.registry import open_checkpoint

    torch.save({"w": torch.ones(4)}, tmp_path / "in.pt")
    opened = file_identity(tmp_path / "in.pt")
    ckpt = open_checkpoint(tmp_path / "in.pt")
    torch.save({"w": torch.zeros(4)}, tmp_path / "other.pt")
    (tmp_path / "other.pt").replace(tmp_path / "in.pt")  # a trainer's atomic save lands meanwhile
    assert not _copy_intact(ckpt, opened, tmp_path / "out.pt", force=False)
    assert not (tmp_path / "out.pt").exists()
