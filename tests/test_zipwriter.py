"""The stored-zip writer behind every .pt we write (``ckpttools.formats.zipwriter``, issue 29): for generated
records (names ASCII or not, sizes from 0, chunked any way) it writes the records Python's ``zipfile`` writes for
the same calls laid out as torch lays them out (64-byte aligned data through torch's padding field; the central
directory without it, as torch's), and where a
record, an offset or the count needs zip64 fields (limits lowered here, so that small files reach them) the
archive still reads back whole in ``zipfile`` and in our reader, and torch loads a checkpoint written so."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpttools.formats import zipwriter
from ckpttools.formats.registry import open_checkpoint
from ckpttools.formats.zipformat import PADDING_ID

RECORDS = st.lists(
    st.tuples(
        st.text(st.characters(min_codepoint=48, max_codepoint=0x3A0), min_size=1, max_size=8),
        st.binary(max_size=300),
        st.integers(1, 64),
    ),
    max_size=6,
    unique_by=lambda r: r[0],
)


def _ours(records) -> bytes:
    out = io.BytesIO()
    writer = zipwriter.StoredZipWriter(out)
    for name, data, chunk in records:
        writer.add(name, [data[i : i + chunk] for i in range(0, len(data), chunk)], len(data))
    writer.close()
    return out.getvalue()


def _zipfile(records) -> bytes:
    """What Python's zipfile writes for the same records with torch's alignment padding."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, data, _ in records:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.file_size = len(data)
            header = 30 + len(name.encode("utf-8")) + 4
            pad = (-(zf.fp.tell() + header)) % 64
            info.extra = struct.pack("<HH", PADDING_ID, pad) + b"Z" * pad
            with zf.open(info, "w") as w:
                w.write(data)
    return out.getvalue()


@settings(max_examples=80, deadline=None)
@given(records=RECORDS)
def test_the_records_are_those_zipfile_writes_and_every_one_is_aligned(records):
    ours, theirs = _ours(records), _zipfile(records)
    cd = ours.find(b"PK\x01\x02") if records else len(ours) - 22
    assert ours[:cd] == theirs[:cd]  # every local header and record as zipfile writes them
    with zipfile.ZipFile(io.BytesIO(ours)) as zf:
        assert zf.testzip() is None  # every CRC32 checks
        for (name, data, _), info in zip(records, zf.infolist()):
            assert info.filename == name and zf.read(info) == data
            name_length, extra_length = struct.unpack_from("<HH", ours, info.header_offset + 26)
            assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0  # the data's first byte


@pytest.fixture
def small_limits(monkeypatch):
    monkeypatch.setattr(zipwriter, "ZIP64_LIMIT", 200)  # records and offsets past 200 bytes: zip64 fields
    monkeypatch.setattr(zipwriter, "CENTRAL_LIMIT", 200)
    monkeypatch.setattr(zipwriter, "COUNT_LIMIT", 3)  # more than 3 records: the zip64 end records


def test_zip64_fields_read_back_in_zipfile_our_reader_and_torch(small_limits, tmp_path):
    records = [(f"r{i}", bytes([i]) * (50 * i), 7) for i in range(8)]  # sizes 0..350, offsets past 200
    data = _ours(records)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None and [zf.read(n) for n, _, _ in records] == [d for _, d, _ in records]
    tree = {f"t{i}": torch.full((i * 20,), float(i)) for i in range(6)}
    path = tmp_path / "z.pt"
    from ckpttools.formats import live_torch

    with open(path, "wb") as f:
        assert live_torch.save(tree, f)
    loaded = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in tree.items())
    ckpt = open_checkpoint(path)
    assert not [f for f in ckpt.findings if f.severity == "error"], ckpt.findings
    assert b"PK\x06\x06" in path.read_bytes()  # the zip64 end record was needed and written


def test_a_zipfile_archive_past_its_zip64_limit_is_not_called_damaged(monkeypatch, tmp_path):
    # Python's zipfile names zip64 in the central entry of a record that starts past 2 GB and leaves its local
    # header at version 20: a genuine library's file, so not a header mismatch (its limit lowered to reach it)
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 200)
    path = tmp_path / "z.pt"
    tree = {f"t{i}": torch.full((40,), float(i)) for i in range(4)}
    torch.save(tree, tmp_path / "src.pt")
    with zipfile.ZipFile(tmp_path / "src.pt") as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))
    assert b"PK\x01\x02" + bytes([45]) in path.read_bytes()  # a central entry says version 45
    ckpt = open_checkpoint(path)
    assert not [f for f in ckpt.findings if f.severity == "error"], ckpt.findings
    assert all(torch.equal(torch.load(path, weights_only=True)[k], v) for k, v in tree.items())


def test_every_damaged_byte_of_the_directory_we_write_is_flagged(tmp_path):
    # the directory carries nothing verify does not check (no padding copies, torch's constant fields), so a
    # flipped bit anywhere in it is found -- as in a file torch.save wrote
    from ckpttools.commands.verify import verify
    from ckpttools.formats import live_torch

    out = io.BytesIO()
    assert live_torch.save({f"w{i}": torch.randn(50) for i in range(6)}, out)
    data = out.getvalue()
    start = data.find(b"PK\x01\x02")
    path, missed = tmp_path / "flip.pt", []
    for pos in range(start, len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= 0x20
        path.write_bytes(damaged)
        if verify(path).ok():
            missed.append(pos - start)
    assert missed == []
