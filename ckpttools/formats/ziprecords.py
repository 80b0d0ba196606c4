"""Zip records as they are on disk: every byte of the file accounted for, CRC32s, truncation, and a
local-header scan for files whose end is gone.  ``torch.load`` ignores the CRC32 each record carries; the
checks that use this module do not.  What the records *mean* for torch is ``formats/torchzip.py``.
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

try:  # ISA-L's crc32 is several times faster than zlib's; optional
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - depends on the environment
    _crc32 = zlib.crc32

LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
CENTRAL_HEADER = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes
ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
LOCAL_MAGIC, CENTRAL_MAGIC, EOCD_MAGIC = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"
ZIP64_EOCD_MAGIC, ZIP64_LOCATOR_MAGIC, DESCRIPTOR_MAGIC = b"PK\x06\x06", b"PK\x06\x07", b"PK\x07\x08"
PADDING_ID = 0x4246  # "FB": torch's alignment padding, filled with b"Z"
CHUNK = 8 << 20


class ZipStructureError(Exception):
    """The zip's end records are gone; ``records`` holds what a local-header scan could still find."""

    def __init__(self, message: str, records: list[Record]):
        super().__init__(message)
        self.records = records


@dataclass
class Record:
    name: str
    header_offset: int
    data_offset: int
    size: int  # bytes of content (uncompressed); torch stores without compression, so also the bytes on disk
    crc: int | None  # from the central directory (or the data descriptor when the directory is gone)
    method: int = 0
    truncated: bool = False  # fewer bytes on disk than the record needs
    end: int = 0  # first byte after the record (after its data descriptor, if any)
    local_name: str | None = None  # the local header's name, where it disagrees with the central directory's
    compressed: int | None = None  # bytes on disk of a compressed (deflated) record; None: stored, == size

    @property
    def stored_size(self) -> int:
        return self.size if self.compressed is None else self.compressed


@dataclass
class ZipProblem:
    code: str
    message: str
    where: str


def crc32(data, value: int = 0) -> int:
    return _crc32(data, value)


class _Window:
    """Reads of a byte range of a file, addressed from the range's start (a zip embedded in a DCP file).
    Through a read-only memory map where the file can be mapped (a slice, no system call: a zip of 200,000
    records is a million small reads), else ``os.pread``."""

    def __init__(self, fd: int, base: int, size: int, mapped: bool = False):
        self.fd, self.base, self.size = fd, base, size
        self.map: mmap.mmap | None = None
        if mapped:  # for many small scattered reads only: pages read stay in the process's RSS
            try:
                self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # an empty file, a file system that cannot map
                self.map = None

    def pread(self, n: int, offset: int) -> bytes:
        n = min(n, self.size - offset)
        if n <= 0 or offset < 0:
            return b""
        if self.map is not None:
            start = self.base + offset
            return self.map[start : start + n]
        return os.pread(self.fd, n, self.base + offset)

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None


def _extra_blocks(extra: bytes) -> list[tuple[int, bytes]] | None:
    blocks, pos = [], 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            return None
        tag, size = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + size > len(extra):
            return None
        blocks.append((tag, extra[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return blocks


def _zip64_values(extra: bytes, wanted: list[str]) -> dict[str, int]:
    """Zip64 extended information: 8-byte values for the fields whose 32-bit copy is 0xFFFFFFFF, in order."""
    for tag, data in _extra_blocks(extra) or []:
        if tag == 0x0001:
            out, pos = {}, 0
            for name in wanted:
                if pos + 8 <= len(data):
                    out[name] = struct.unpack_from("<Q", data, pos)[0]
                    pos += 8
            return out
    return {}


def _find_eocd(src: _Window, size: int) -> int | None:
    tail_len = min(size, 65535 + EOCD.size)
    tail = src.pread(tail_len, size - tail_len)
    pos = tail.rfind(EOCD_MAGIC)
    while pos >= 0:
        if pos + EOCD.size <= len(tail):
            comment_len = struct.unpack_from("<H", tail, pos + 20)[0]
            if pos + EOCD.size + comment_len == len(tail):
                return size - tail_len + pos
        pos = tail.rfind(EOCD_MAGIC, 0, pos)
    return None


FirstRecord = Callable[[Record, bytes], None]


def parse_zip(
    path: Path, base: int = 0, length: int | None = None, on_first: FirstRecord | None = None
) -> tuple[list[Record], list[ZipProblem]]:
    """Records of the zip (or of the zip embedded at ``base``, ``length`` bytes long), and every structural
    problem found by accounting for each byte.  Record offsets are absolute file offsets.

    ``on_first(record, data)``: called with the directory's first record and its stored bytes once that record
    is checked and whole, before the others are (torch writes data.pkl first: its safety scan can start while
    the other 200,000 records of a large checkpoint are checked).  Its offsets are relative to ``base`` then.

    Raises ZipStructureError (carrying a local-header scan) when the end records cannot be found."""
    size = path.stat().st_size - base if length is None else length
    problems: list[ZipProblem] = []
    fd = os.open(path, os.O_RDONLY)
    src = _Window(fd, base, size, mapped=True)
    try:
        records = _parse(src, size, problems, path, base, on_first)
        for r in records:  # relative -> absolute
            r.header_offset += base
            r.data_offset += base if r.data_offset >= 0 else 0
            r.end += base
        return records, problems
    finally:
        src.close()
        os.close(fd)


@dataclass
class _End:
    """What the end records say: where the central directory is, how many entries it holds."""

    n_total: int
    cd_size: int
    cd_offset: int
    cd_end_expected: int  # where the directory must end: the (zip64) end record
    comment_len: int
    zip64_versions: tuple[int, int] | None = None  # (made by, needed) of a zip64 end record


def _parse(
    src: _Window, size: int, problems: list[ZipProblem], path: Path, base: int, on_first: FirstRecord | None = None
) -> list[Record]:
    end = _end_records(src, size, problems, path, base)
    if end.cd_offset + end.cd_size != end.cd_end_expected:
        problems.append(
            ZipProblem(
                "zip.structure",
                f"central directory spans {end.cd_offset}..{end.cd_offset + end.cd_size}, "
                f"the end records start at {end.cd_end_expected}",
                "central directory",
            )
        )
    entries = _directory_entries(src, size, end, path, base)
    # every entry checked against its local header; what only a torch-written file must satisfy is kept aside
    # until the entries have said whether this is one (most records padded the way torch pads them)
    checked = [_check_entry(src, size, *entry) for entry in entries[:1]]
    if on_first and checked and not checked[0].problems and not checked[0].record.truncated:
        first = checked[0].record
        if first.method == 0:
            on_first(first, src.pread(first.size, first.data_offset))
    checked += [_check_entry(src, size, fields, name_bytes, extra) for fields, name_bytes, extra in entries[1:]]
    torch_style = bool(entries) and sum(e.padded for e in checked) * 2 > len(entries)
    if torch_style:
        _check_torch_constants(entries, end, problems)
    records = _placed_records(checked, torch_style, end.cd_offset, problems)
    if end.comment_len:
        problems.append(
            ZipProblem(
                "zip.structure",
                f"zip comment of {end.comment_len} bytes (torch writes none)",
                "end of central directory",
            )
        )
    return records


def _end_records(src: _Window, size: int, problems: list[ZipProblem], path: Path, base: int) -> _End:
    """The end of central directory record, and the zip64 one where a locator points to it, cross-checked."""
    eocd_at = _find_eocd(src, size)
    if eocd_at is None:
        raise ZipStructureError("end of central directory not found", scan_local_headers(path, base, size))
    (_, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment_len) = EOCD.unpack(src.pread(EOCD.size, eocd_at))
    end = _End(n_total, cd_size, cd_offset, eocd_at, comment_len)
    where = "end of central directory"
    if disk or cd_disk:
        problems.append(
            ZipProblem("zip.structure", f"end record names disk {disk}/{cd_disk}; a checkpoint is one file", where)
        )
    if n_disk != n_total:
        problems.append(ZipProblem("zip.structure", f"end record counts {n_disk} vs {n_total} entries", where))
    loc_at = eocd_at - ZIP64_LOCATOR.size
    if loc_at < 0 or src.pread(4, loc_at) != ZIP64_LOCATOR_MAGIC:
        return end
    where64 = "zip64 end of central directory"
    _, z_disk, z64_at, z_disks = ZIP64_LOCATOR.unpack(src.pread(ZIP64_LOCATOR.size, loc_at))
    raw = src.pread(ZIP64_EOCD.size, z64_at)
    if len(raw) < ZIP64_EOCD.size or raw[:4] != ZIP64_EOCD_MAGIC or z64_at + ZIP64_EOCD.size != loc_at:
        problems.append(ZipProblem("zip.structure", "zip64 end record not where its locator points", where64))
        return end
    (_, rec_size, z_made, z_need, z_d, z_cd_d, z_n_disk, z_n_total, z_cd_size, z_cd_offset) = ZIP64_EOCD.unpack(raw)
    if rec_size != ZIP64_EOCD.size - 12 or z_d or z_cd_d or z_disk or z_disks != 1 or z_n_disk != z_n_total:
        problems.append(ZipProblem("zip.structure", "zip64 end record fields are inconsistent", where64))
    for small, big, what in (
        (n_total, z_n_total, "entry count"),
        (cd_size, z_cd_size, "directory size"),
        (cd_offset, z_cd_offset, "directory offset"),
    ):
        if small not in (big, 0xFFFF, 0xFFFFFFFF):
            problems.append(ZipProblem("zip.structure", f"end records disagree on the {what}", where))
    return _End(z_n_total, z_cd_size, z_cd_offset, z64_at, comment_len, (z_made, z_need))


def _directory_entries(src: _Window, size: int, end: _End, path: Path, base: int) -> list[tuple]:
    """(fields, name bytes, extra) of every central-directory entry; a directory that does not hold what the end
    record says is a ZipStructureError carrying the records a local-header scan finds."""
    cd = src.pread(end.cd_size, end.cd_offset)
    entries = []
    pos = 0
    while pos + CENTRAL_HEADER.size <= len(cd) and cd[pos : pos + 4] == CENTRAL_MAGIC:
        fields = CENTRAL_HEADER.unpack_from(cd, pos)
        name_len, extra_len, comment = fields[10], fields[11], fields[12]
        name_bytes = cd[pos + 46 : pos + 46 + name_len]
        extra = cd[pos + 46 + name_len : pos + 46 + name_len + extra_len]
        entries.append((fields, name_bytes, extra))
        pos += 46 + name_len + extra_len + comment
    if pos != len(cd) or len(entries) != end.n_total:
        # a directory that breaks off (a zeroed page, wrong counts) cannot be trusted for the entries it still
        # shows either (the one at the break has half its fields): read the records as a truncated file's are,
        # from their local headers
        raise ZipStructureError(
            f"the central directory holds {len(entries)} readable entries in {pos} of "
            f"{len(cd)} bytes, the end record says {end.n_total}",
            scan_local_headers(path, base, size),
        )
    return entries


def _check_torch_constants(entries: list[tuple], end: _End, problems: list[ZipProblem]) -> None:
    """Fields torch writes identically for every entry (other writers vary them by entry: Python's zipfile sets
    "version made by" per compression method), and its zip64 end record's versions."""
    for index, label in (
        (1, "version made by"),
        (13, "disk number"),
        (14, "internal attributes"),
        (15, "external attributes"),
    ):
        values = Counter(e[0][index] for e in entries)
        if len(entries) <= 2 or len(values) == 1:
            continue
        common = max(values, key=values.__getitem__)
        for e in entries:
            if e[0][index] != common:
                problems.append(
                    ZipProblem(
                        "zip.structure",
                        f"central directory {label} {e[0][index]:#x} differs from every other entry's {common:#x}",
                        e[1].decode("utf-8", "replace"),
                    )
                )
    if end.zip64_versions is not None and end.zip64_versions != TORCH_ZIP64_VERSIONS:
        problems.append(
            ZipProblem(
                "zip.structure",
                f"zip64 end record versions {end.zip64_versions} differ from torch's {TORCH_ZIP64_VERSIONS}",
                "zip64 end of central directory",
            )
        )


def _placed_records(checked: list, torch_style: bool, cd_offset: int, problems: list[ZipProblem]) -> list[Record]:
    """The entries' records in file order, each starting where the previous one ends: overlapping ones dropped
    (an error), gaps reported, every byte before the directory accounted for."""
    records, expected_local = [], 0
    for entry in checked:
        rec = entry.record
        if rec.header_offset < expected_local:
            # bytes that belong to an earlier record (a non-recursive zip bomb gives one 4 MB record 50,000
            # names): an error, and the entry is dropped so that nothing reads or checks those bytes again
            problems.append(
                ZipProblem(
                    "zip.overlap",
                    f"record {rec.name} at offset {rec.header_offset} lies "
                    f"inside or before the previous record (which ends at {expected_local})",
                    rec.name,
                )
            )
            continue
        records.append(rec)
        problems.extend(p for p in entry.problems if torch_style or id(p) not in entry.torch_only)
        if rec.header_offset != expected_local:
            problems.append(
                ZipProblem(
                    "zip.structure",
                    f"{rec.header_offset - expected_local:+d} unaccounted bytes before record {rec.name}",
                    rec.name,
                )
            )
        expected_local = rec.end
    if records and expected_local != cd_offset:
        problems.append(
            ZipProblem(
                "zip.structure",
                f"{cd_offset - expected_local:+d} unaccounted bytes before the central directory",
                "central directory",
            )
        )
    return records


LIKELY_EXTRA = 96  # bytes of local extra field read with the header (torch's alignment padding is under 64)
TORCH_ZIP64_VERSIONS = (0x031E, 45)  # what torch's writer (miniz) puts in the zip64 end record


@dataclass
class _Entry:
    """One central-directory entry checked against its local header."""

    record: Record
    problems: list[ZipProblem]
    torch_only: set[int]  # ids of the problems that count only in a torch-written file
    padded: bool  # laid out as torch writes a record: a data descriptor, and torch's padding (or no extra field)


PADDING_TAG = struct.pack("<H", PADDING_ID)


def _check_entry(src: _Window, size: int, fields, name_bytes: bytes, extra: bytes) -> _Entry:
    """The record a central-directory entry describes, and every way its local header, extra fields and data
    descriptor disagree with it.  Called once per record (200,000 in an optimizer's checkpoint): the common
    case, where everything agrees, is decided with few comparisons."""
    (_, _made, need, flags, method, mtime, mdate, crc, csize, usize, _nl, _el, _cl, _disk, _iattr, _eattr, offset) = (
        fields
    )
    name = name_bytes.decode("utf-8", "replace")
    problems: list[ZipProblem] = []
    torch_only: set[int] = set()
    big: dict[str, int] = {}
    if 0xFFFFFFFF in (usize, csize, offset):
        wanted = [n for n, v in (("usize", usize), ("csize", csize), ("offset", offset)) if v == 0xFFFFFFFF]
        big = _zip64_values(extra, wanted)
        usize, csize, offset = big.get("usize", usize), big.get("csize", csize), big.get("offset", offset)
    if extra and _extra_blocks(extra) is None:
        problems.append(ZipProblem("zip.structure", "central directory extra field is malformed", name))
    # one read for the header, its name and (usually) its extra field: torch pads to 64 bytes
    blob = src.pread(LOCAL_HEADER.size + len(name_bytes) + LIKELY_EXTRA, offset)
    if len(blob) < LOCAL_HEADER.size or blob[:4] != LOCAL_MAGIC:
        problems.append(ZipProblem("zip.header-mismatch", f"no local header at offset {offset}", name))
        return _Entry(Record(name, offset, -1, csize, crc, method, truncated=True, end=offset), problems, set(), False)
    (_, l_need, l_flags, l_method, l_time, l_date, l_crc, l_csize, l_usize, l_nl, l_el) = LOCAL_HEADER.unpack_from(blob)
    if 30 + l_nl + l_el <= len(blob):
        l_name, l_extra = blob[30 : 30 + l_nl], blob[30 + l_nl : 30 + l_nl + l_el]
    else:
        l_name = src.pread(l_nl, offset + 30)
        l_extra = src.pread(l_el, offset + 30 + l_nl)
    data_offset = offset + 30 + l_nl + l_el
    mismatched = []
    if {l_need, need} <= {20, 45}:  # zip64 named in the central entry only (Python's zipfile past 2 GB): harmless
        l_need = need
    local = (l_need, l_flags, l_method, l_time, l_date, l_name)
    if local != (need, flags, method, mtime, mdate, name_bytes):  # the rare case: say which fields differ
        mismatched = [
            label for label, a, b in zip(LOCAL_FIELDS, local, (need, flags, method, mtime, mdate, name_bytes)) if a != b
        ]
    descriptor = bool(flags & 0x08)
    if descriptor:
        if (l_crc, l_csize, l_usize) != (0, 0, 0) and (l_crc, l_csize, l_usize) != (crc, csize, usize):
            mismatched.append("crc/sizes")
    else:
        l64 = _zip64_values(l_extra, [n for n, v in (("usize", l_usize), ("csize", l_csize)) if v == 0xFFFFFFFF])
        if (l_crc, l64.get("csize", l_csize), l64.get("usize", l_usize)) != (crc, csize, usize):
            mismatched.append("crc/sizes")
    if mismatched:
        message = f"local header and central directory disagree on {', '.join(mismatched)}"
        problems.append(ZipProblem("zip.header-mismatch", message, name))
    intact_padding = (  # torch's one padding block, all 'Z': the common case, nothing to split
        l_extra[:2] == PADDING_TAG
        and len(l_extra) == 4 + int.from_bytes(l_extra[2:4], "little")
        and not l_extra[4:].strip(b"Z")
    )
    if l_extra and not intact_padding:
        _check_local_extra(l_extra, name, problems, torch_only)
    end = data_offset + csize
    truncated = end > size
    if descriptor and not truncated:
        d_len = _check_descriptor(src, end, bool(big) or csize >= 0xFFFFFFFF, (crc, csize, usize), name, problems)
        truncated = d_len is None
        end += d_len or 0
    if truncated:
        message = f"record {name} extends past the end of the file (needs {csize} bytes)"
        problems.append(ZipProblem("zip.record-truncated", message, name))
    local_name = l_name.decode("utf-8", "replace") if l_name != name_bytes else None
    # as torch lays a record out (counted from the directory's own offset field, as it was before zip64 values)
    # (or as our zipwriter does, without the descriptor but always with the padding field)
    padded = fields[16] == offset and (l_extra[:2] == PADDING_TAG or (descriptor and l_el == 0))
    size_out, compressed = (usize, csize) if method else (csize, None)
    record = Record(name, offset, data_offset, size_out, crc, method, truncated, end, local_name, compressed)
    return _Entry(record, problems, torch_only, padded)


LOCAL_FIELDS = ("version", "flags", "method", "time", "date", "name")


def _check_local_extra(extra: bytes, name: str, problems: list[ZipProblem], torch_only: set[int]) -> None:
    """A local extra field that is not torch's one intact padding block: malformed, damaged padding, or a block
    a torch-written record does not have (judged only if the file turns out to be torch-written)."""
    blocks = _extra_blocks(extra)
    if blocks is None:
        problems.append(ZipProblem("zip.structure", "local extra field is malformed", name))
        return
    for tag, data in blocks:
        if tag == PADDING_ID and data.strip(b"Z"):
            problems.append(ZipProblem("zip.structure", "alignment padding is damaged (torch writes only 'Z')", name))
        elif tag not in (PADDING_ID, 0x0001):
            problems.append(
                ZipProblem(
                    "zip.structure",
                    f"unexpected extra block {tag:#06x} in a torch-written record (damaged padding header?)",
                    name,
                )
            )
            torch_only.add(id(problems[-1]))


def _check_descriptor(
    src: _Window, at: int, zip64: bool, expected: tuple[int, int, int], name: str, problems: list[ZipProblem]
) -> int | None:
    """The data descriptor after a record's data: its length, or None when the file ends first."""
    d_len = 24 if zip64 else 16
    raw = src.pread(d_len, at)
    if len(raw) < d_len:
        return None
    d_sig, d_crc = raw[:4], struct.unpack_from("<I", raw, 4)[0]
    d_csize, d_usize = struct.unpack_from("<QQ" if zip64 else "<II", raw, 8)
    if d_sig != DESCRIPTOR_MAGIC or (d_crc, d_csize, d_usize) != expected:
        problems.append(ZipProblem("zip.header-mismatch", "data descriptor disagrees with the central directory", name))
    return d_len


def scan_local_headers(path: Path, base: int = 0, length: int | None = None) -> list[Record]:
    """Walk the file from the start, record by record, without the central directory (for damaged files).

    torch writes data descriptors after each record's data (flag bit 3), so a record ends where a descriptor
    signature is followed by a size equal to the bytes since the data started."""
    records: list[Record] = []
    size = path.stat().st_size - base if length is None else length
    fd = os.open(path, os.O_RDONLY)
    src = _Window(fd, base, size)
    try:
        offset = 0
        while offset + LOCAL_HEADER.size <= size:
            head = src.pread(LOCAL_HEADER.size, offset)
            if head[:4] != LOCAL_MAGIC:
                break
            (_, _need, flags, method, _t, _d, crc, csize, _usize, nl, el) = LOCAL_HEADER.unpack(head)
            name = src.pread(nl, offset + 30).decode("utf-8", "replace")
            data_offset = offset + 30 + nl + el
            if flags & 0x08:
                found = _find_descriptor(src, data_offset, size)
                if found is None:
                    records.append(Record(name, offset, data_offset, size - data_offset, None, method, True, size))
                    break
                crc, csize, d_len = found
                end = data_offset + csize + d_len
            else:
                end = data_offset + csize
            truncated = end > size
            records.append(Record(name, offset, data_offset, csize, crc, method, truncated, min(end, size)))
            if truncated:
                break
            offset = end
    finally:
        os.close(fd)
    for r in records:
        r.header_offset, r.data_offset, r.end = r.header_offset + base, r.data_offset + base, r.end + base
    return records


def _find_descriptor(src: _Window, data_offset: int, size: int) -> tuple[int, int, int] | None:
    """(crc, size, descriptor length) of the first descriptor whose size field matches its position."""
    pos, overlap, window = data_offset, 3, 64 << 10
    while pos < size:
        block = src.pread(min(window, size - pos), pos)
        window = min(window * 2, CHUNK)  # most records are small: start small, grow for big tensors
        i = block.find(DESCRIPTOR_MAGIC)
        while i >= 0:
            at = pos + i
            raw = src.pread(24, at)
            length = at - data_offset
            if len(raw) >= 16 and struct.unpack_from("<II", raw, 8) == (length, length):
                return struct.unpack_from("<I", raw, 4)[0], length, 16
            if len(raw) >= 24 and struct.unpack_from("<QQ", raw, 8) == (length, length):
                return struct.unpack_from("<I", raw, 4)[0], length, 24
            i = block.find(DESCRIPTOR_MAGIC, i + 1)
        if len(block) <= overlap:
            break
        pos += len(block) - overlap
    return None


def read_records(
    path: Path, base: int = 0, length: int | None = None, on_first: FirstRecord | None = None
) -> tuple[list[Record], list[ZipProblem]]:
    return parse_zip(path, base, length, on_first)


def iter_record_bytes(
    path: Path, record: Record, chunk: int = CHUNK, start: int = 0, length: int | None = None
) -> Iterator[bytes]:
    """Stream a stored record's bytes (or a byte range of it) with bounded memory."""
    if record.method == 8:  # deflate (not written by torch, but other zip tools do)
        yield from _iter_deflated(path, record, chunk, start, length)
        return
    if record.method != 0:
        raise OSError(f"record {record.name}: unsupported compression method {record.method}")
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = record.data_offset + start
        end = record.data_offset + (record.size if length is None else min(record.size, start + length))
        while pos < end:
            block = os.pread(fd, min(chunk, end - pos), pos)
            if not block:
                return  # truncated file
            pos += len(block)
            yield block
    finally:
        os.close(fd)


class RecordReader:
    """The records of one file read through one descriptor, opened at first use and closed with the reader: a
    checkpoint of 200,000 small tensors is 200,000 records, and an open and a close per record cost more than
    the read.  The descriptor also keeps reading the file that was opened if a writer renames another over it."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def chunks(self, record: Record, chunk: int = CHUNK) -> Iterable[bytes]:
        if record.method != 0 or record.size > chunk:
            return iter_record_bytes(self.path, record, chunk)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            weakref.finalize(self, os.close, self._fd)
        block = os.pread(self._fd, record.size, record.data_offset) if record.size else b""
        return (block,) if block else ()  # short at the end of a truncated file, as iter_record_bytes


def _iter_deflated(path: Path, record: Record, chunk: int, start: int, length: int | None) -> Iterator[bytes]:
    """A deflated record's content, inflated ``chunk`` bytes at a time whatever the ratio (a 1 GiB record of
    zeros deflates to 1 MB: memory stays at one chunk); content past the declared size is an error (a record
    that lies about its size is not inflated without bound)."""
    inflater = zlib.decompressobj(-15)
    end = None if length is None else start + length
    produced = 0
    raw_record = Record(record.name, record.header_offset, record.data_offset, record.stored_size, record.crc, 0)

    def pieces() -> Iterator[bytes]:
        for raw in iter_record_bytes(path, raw_record, chunk):
            while raw:
                yield inflater.decompress(raw, chunk)
                raw = inflater.unconsumed_tail
        yield inflater.flush()

    for out in pieces():
        lo, produced = produced, produced + len(out)
        if produced > record.size:
            raise OSError(f"record {record.name}: inflates past its declared {record.size} bytes")
        cut = out[max(0, start - lo) : len(out) if end is None else max(0, end - lo)]
        if cut:
            yield cut
        if end is not None and produced >= end:
            return


def read_record(path: Path, record: Record) -> bytes:
    return b"".join(iter_record_bytes(path, record))


def record_crc(path: Path, record: Record) -> int | None:
    """CRC32 of the record's bytes as they are on disk; None if they are not all there."""
    if record.truncated or record.data_offset < 0:
        return None
    crc, n = 0, 0
    try:
        for block in iter_record_bytes(path, record):
            crc = crc32(block, crc)
            n += len(block)
    except (OSError, zlib.error):  # a damaged method field, an unreadable stream: not a good reading
        return None
    return crc if n == record.size else None


def locate_intact(path: Path, record: Record, scanned: list[Record] | None = None) -> Record | None:
    """A reading of ``record`` whose bytes pass its CRC32, when only the zip's metadata around it is damaged:
    as recorded; at the position a local-header scan finds for it; or at the 64-byte aligned data offsets torch's
    writer uses after a local header whose length fields were damaged.  None if no reading passes."""
    if record.crc is not None and record_crc(path, record) == record.crc:
        return record
    candidates = []
    for other in scanned or []:
        if other.name == record.name or other.header_offset == record.header_offset:
            candidates.append(other)
            if record.crc is not None:  # the central directory's CRC and size with the scanned position
                candidates.append(
                    Record(
                        record.name,
                        other.header_offset,
                        other.data_offset,
                        record.size,
                        record.crc,
                        record.method,
                        False,
                        other.end,
                    )
                )
    if record.method != 0:  # torch stores; a damaged method field is one more thing the metadata got wrong
        candidates.append(
            Record(record.name, record.header_offset, record.data_offset, record.size, record.crc, 0, False, record.end)
        )
    base = record.header_offset + LOCAL_HEADER.size + len(record.name.encode("utf-8"))
    for extra in range(0, 64 + 4 + 20 + 1):
        start = base + extra
        if start % 64 == 0 and record.crc is not None:
            candidates.append(
                Record(record.name, record.header_offset, start, record.size, record.crc, 0, False, start + record.size)
            )
    for candidate in candidates:  # the caller checks that the size is the one its storage needs
        if candidate.crc is not None and record_crc(path, candidate) == candidate.crc:
            return candidate
    return None


def rebuild_central_directory(path: Path) -> list[tuple[int, bytes]] | None:
    """Patches, (offset, bytes), that mend a zip whose records are whole but whose central directory is
    damaged (a zeroed page, wrong entry counts): the directory rebuilt from the local headers with the entries
    torch's writer made, and the end records' counts, so the file comes back as it was written.  None unless
    every condition holds: the end record is readable, a local-header scan finds records back to back from
    byte 0 up to the directory, every one passes its CRC32, and the rebuilt directory has exactly the size the
    end record gives."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        src = _Window(fd, 0, size)
        eocd_at = _find_eocd(src, size)
        if eocd_at is None:
            return None
        n_total, cd_size, cd_offset = EOCD.unpack(src.pread(EOCD.size, eocd_at))[4:7]
        z64_at = None
        loc_at = eocd_at - ZIP64_LOCATOR.size
        if loc_at >= 0 and src.pread(4, loc_at) == ZIP64_LOCATOR_MAGIC:
            z64_at = ZIP64_LOCATOR.unpack(src.pread(ZIP64_LOCATOR.size, loc_at))[2]
            raw = src.pread(ZIP64_EOCD.size, z64_at)
            if len(raw) < ZIP64_EOCD.size or raw[:4] != ZIP64_EOCD_MAGIC:
                return None
            cd_size, cd_offset = ZIP64_EOCD.unpack(raw)[8:10]
        records = scan_local_headers(path)
        if not records or records[0].header_offset != 0 or records[-1].end != cd_offset:
            return None
        if any(r.truncated or r.crc is None or record_crc(path, r) != r.crc for r in records):
            return None
        if any(a.end != b.header_offset for a, b in zip(records, records[1:])):
            return None
        template = _surviving_constants(src.pread(min(cd_size, 1 << 20), cd_offset))
        directory = b"".join(_central_entry(src, r, template) for r in records)
    finally:
        os.close(fd)
    if len(directory) != cd_size:
        return None
    n = len(records)
    counts = struct.pack("<HH", min(n, 0xFFFF), min(n, 0xFFFF)) if n < 0xFFFF or n_total == 0xFFFF else None
    patches = [(cd_offset, directory)] + ([(eocd_at + 8, counts)] if counts else [])
    if z64_at is not None:
        patches.append((z64_at + 24, struct.pack("<QQ", n, n)))
    return patches


def _surviving_constants(cd: bytes) -> tuple[int, int, int, int]:
    """(version made by, disk, internal attributes, external attributes) of the directory entries still
    readable at its start: fields a writer sets the same for every entry (torch's: all 0)."""
    pos, seen = 0, []
    while pos + CENTRAL_HEADER.size <= len(cd) and cd[pos : pos + 4] == CENTRAL_MAGIC:
        fields = CENTRAL_HEADER.unpack_from(cd, pos)
        seen.append((fields[1], fields[13], fields[14], fields[15]))
        pos += 46 + fields[10] + fields[11] + fields[12]
    return max(set(seen), key=seen.count) if seen else (0, 0, 0, 0)


def _central_entry(src: _Window, r: Record, template: tuple[int, int, int, int]) -> bytes:
    """One central-directory entry for a scanned record, its fields taken from the local header (as a writer
    copies them), CRC and sizes from the data descriptor; a zip64 extra for what does not fit 32 bits."""
    head = LOCAL_HEADER.unpack(src.pread(LOCAL_HEADER.size, r.header_offset))
    need, flags, method, mtime, mdate, nl = head[1], head[2], head[3], head[4], head[5], head[9]
    name = src.pread(nl, r.header_offset + 30)
    made_by, disk, internal, external = template
    big = [(v, 0xFFFFFFFF) if v >= 0xFFFFFFFF else (None, v) for v in (r.size, r.size, r.header_offset)]
    extra = b"".join(struct.pack("<Q", v) for v, _ in big if v is not None)
    extra = struct.pack("<HH", 0x0001, len(extra)) + extra if extra else b""
    return (
        CENTRAL_HEADER.pack(
            CENTRAL_MAGIC,
            made_by,
            need,
            flags,
            method,
            mtime,
            mdate,
            r.crc,
            big[1][1],
            big[0][1],
            nl,
            len(extra),
            0,
            disk,
            internal,
            external,
            big[2][1],
        )
        + name
        + extra
    )
