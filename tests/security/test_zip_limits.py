"""Hostile zip containers (issue 25): every command answers within the limits of ``test_bounded`` (20 s, 1.2 GB,
200 kB printed, a documented exit code, no traceback), whatever the number of records, however many names
share one record, however far a record inflates.  Each file is generated here, from a genuine ``torch.save``
file, the way the attack is described."""

from __future__ import annotations

import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ckpttools.formats import zipformat, ziprecords
from ckpttools.formats.torch_pickler import pickle_tree
from ckpttools.tensors import DType, LazyTensor, StorageRef
from tests.security.test_bounded import COMMANDS, LIMIT_RSS_KB, _ckpt, run_bounded

pytestmark = pytest.mark.slow  # ~1 minute: 3 generated files x 7 commands, each in its own process


def _copy_records(src: Path, out: zipfile.ZipFile) -> None:
    with zipfile.ZipFile(src) as z:
        for info in z.infolist():
            out.writestr(info, z.read(info))


def many_empty_records(path: Path, n: int = 300_000) -> Path:
    torch.save({"w": torch.ones(4)}, path.with_suffix(".base"))
    with zipfile.ZipFile(path, "w") as out:
        _copy_records(path.with_suffix(".base"), out)
        for i in range(n):
            out.writestr(f"{path.stem}.base/extra/{i}", b"")
    return path


def shared_record_bomb(path: Path, names: int = 50_000) -> Path:
    """A non-recursive zip bomb: one 4 MB storage record, and 50,000 more directory entries pointing at it."""
    base = path.with_suffix(".base")
    torch.save({"w": torch.zeros(1 << 20)}, base)
    data = base.read_bytes()
    records, _ = ziprecords.parse_zip(base)
    storage = next(r for r in records if r.name.endswith("data/0"))
    cd_offset = records[-1].end
    entries, pos = [], data.index(b"PK\x01\x02", cd_offset)
    while data[pos : pos + 4] == b"PK\x01\x02":
        fields = zipformat.CENTRAL_HEADER.unpack_from(data, pos)
        size = 46 + fields[10] + fields[11] + fields[12]
        entries.append(data[pos : pos + size])
        pos += size
    template = next(e for e in entries if struct.unpack_from("<I", e, 42)[0] == storage.header_offset)
    fields = list(zipformat.CENTRAL_HEADER.unpack_from(template, 0))
    name_len = fields[10]
    bomb = []
    for i in range(names):
        name = f"{base.stem}/data/x{i}".encode()
        fields[10] = len(name)
        bomb.append(zipformat.CENTRAL_HEADER.pack(*fields) + name + template[46 + name_len :])
    directory = b"".join(entries + bomb)
    n = len(entries) + len(bomb)
    z64 = b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 0x031E, 45, 0, 0, n, n, len(directory), cd_offset)
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, cd_offset + len(directory), 1)
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(data[:cd_offset] + directory + z64 + locator + end)
    return path


def deflated_gigabyte(path: Path, declared: int | None = None) -> Path:
    """A 1 GiB float32 storage of zeros stored deflated: 1 MB on disk; ``torch.load`` reads it."""
    n = 1 << 28
    data_pkl, _ = pickle_tree({"w": LazyTensor(StorageRef("0", DType("float32"), n, "cpu"), 0, (n,), (1,))})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", b"little")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        block = bytes(8 << 20)
        with zf.open(info, "w", force_zip64=True) as w:
            for _ in range(4 * n // len(block)):
                w.write(block)
        zf.writestr("archive/version", b"3\n")
    if declared is not None:  # a record that lies: it inflates to more than its directory entry says
        raw = bytearray(path.read_bytes())
        (pos,) = _entries_named(raw, b"archive/data/0")
        struct.pack_into("<I", raw, pos + 24, declared)  # the directory's uncompressed size
        path.write_bytes(bytes(raw))
    return path


def _entries_named(raw: bytearray, name: bytes) -> list[int]:
    out, pos = [], raw.find(b"PK\x01\x02")
    while pos >= 0:
        if raw[pos + 46 : pos + 46 + len(name)] == name:
            out.append(pos)
        pos = raw.find(b"PK\x01\x02", pos + 1)
    return out


@pytest.fixture(scope="module")
def hostile_zips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("zips")
    files = {
        "empties": many_empty_records(folder / "empties.pt"),
        "bomb": shared_record_bomb(folder / "bomb.pt"),
        "deflated": deflated_gigabyte(folder / "deflated.pt"),
    }
    assert files["bomb"].stat().st_size < 10 << 20 and files["deflated"].stat().st_size < 2 << 20
    return files


@pytest.mark.parametrize("name", ["empties", "bomb", "deflated"])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_bounded_on_hostile_zips(hostile_zips, tmp_path, name, command):
    code, output = run_bounded(command, hostile_zips[name], tmp_path)
    if name == "bomb" and command == "verify":
        assert code == 1 and "zip.overlap" in output
    if name == "deflated" and command == "verify":
        assert code == 0, output  # a deflated record is legal zip: read, inflated in bounded memory, checked


def test_the_deflated_gigabyte_is_what_torch_reads(hostile_zips, tmp_path):
    code, output, _ = _ckpt(["convert", str(hostile_zips["deflated"]), str(tmp_path / "plain.pt")])
    assert code == 0, output
    # in a child process: a 1 GiB tensor in this one would raise the RSS high-water mark that later children
    # inherit across exec (ru_maxrss survives execve on Linux), and the memory limits above would read it
    check = (
        "import sys, torch; w = torch.load(sys.argv[1], weights_only=True, mmap=True)['w']; "
        "assert w.shape == (1 << 28,) and not w.any()"
    )
    subprocess.run([sys.executable, "-c", check, str(tmp_path / "plain.pt")], check=True, timeout=120)


def test_a_record_that_inflates_past_its_declared_size_is_an_error(tmp_path):
    path = deflated_gigabyte(tmp_path / "liar.pt", declared=1 << 20)
    code, output, rss = _ckpt(["verify", str(path)])
    assert code == 1 and "Traceback" not in output and rss <= LIMIT_RSS_KB, output[-1500:]
