"""Zip records as they are on disk: every byte of the file accounted for, CRC32s, truncation, and a
local-header scan for files whose end is gone.  ``torch.load`` ignores the CRC32 each record carries; the
checks that use this module do not.  What the records *mean* for torch is ``formats/torchzip.py``.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckpttools.formats.zipformat import (
    CENTRAL_HEADER,
    CENTRAL_MAGIC,
    DESCRIPTOR_MAGIC,
    EOCD,
    LOCAL_HEADER,
    LOCAL_MAGIC,
    PADDING_ID,
    TORCH_ZIP64_VERSIONS,
    ZIP64_EOCD,
    ZIP64_EOCD_MAGIC,
    ZIP64_LOCATOR,
    ZIP64_LOCATOR_MAGIC,
    Record,
    Window,
    ZipProblem,
    ZipStructureError,
    extra_blocks,
    find_eocd,
    zip64_values,
)
from ckpttools.formats.ziprecover import scan_local_headers

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
    src = Window(fd, base, size, mapped=True)
    try:
        records = _parse(src, size, problems, path, base, on_first)
        for r in records if base else ():  # relative -> absolute (a zip embedded at ``base``; new ints per record)
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
    src: Window, size: int, problems: list[ZipProblem], path: Path, base: int, on_first: FirstRecord | None = None
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
    cd, starts = _directory_entries(src, size, end, path, base)
    # every entry checked against its local header; what only a torch-written file must satisfy is kept aside
    # until the entries have said whether this is one (most records padded the way torch pads them)
    constants: Counter = Counter()
    checked = [_check_entry(src, size, cd, pos, constants) for pos in starts[:1]]
    if on_first and checked and not checked[0].problems and not checked[0].record.truncated:
        first = checked[0].record
        if first.method == 0:
            on_first(first, src.pread(first.size, first.data_offset))
    checked += [_check_entry(src, size, cd, pos, constants) for pos in starts[1:]]
    torch_style = bool(starts) and sum(e.padded for e in checked) * 2 > len(starts)
    if torch_style:
        _check_torch_constants(constants, cd, starts, end, problems)
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


def _end_records(src: Window, size: int, problems: list[ZipProblem], path: Path, base: int) -> _End:
    """The end of central directory record, and the zip64 one where a locator points to it, cross-checked."""
    eocd_at = find_eocd(src, size)
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


def _directory_entries(src: Window, size: int, end: _End, path: Path, base: int) -> tuple[bytes, array]:
    """The central directory's bytes and where each entry starts in them; a directory that does not hold what
    the end record says is a ZipStructureError carrying the records a local-header scan finds.  Positions, not
    unpacked entries: 200,000 entries held as tuples while they are checked cost 80 MB."""
    cd = src.pread(end.cd_size, end.cd_offset)
    starts = array("Q")
    pos = 0
    while pos + CENTRAL_HEADER.size <= len(cd) and cd[pos : pos + 4] == CENTRAL_MAGIC:
        starts.append(pos)
        name_len, extra_len, comment = NAME_EXTRA_COMMENT.unpack_from(cd, pos + 28)
        pos += 46 + name_len + extra_len + comment
    if pos != len(cd) or len(starts) != end.n_total:
        # a directory that breaks off (a zeroed page, wrong counts) cannot be trusted for the entries it still
        # shows either (the one at the break has half its fields): read the records as a truncated file's are,
        # from their local headers
        raise ZipStructureError(
            f"the central directory holds {len(starts)} readable entries in {pos} of "
            f"{len(cd)} bytes, the end record says {end.n_total}",
            scan_local_headers(path, base, size),
        )
    return cd, starts


NAME_EXTRA_COMMENT = struct.Struct("<HHH")  # a central entry's name, extra and comment lengths, at byte 28

# fields torch writes identically for every entry, by their place in CENTRAL_HEADER (other writers vary them by
# entry: Python's zipfile sets "version made by" per compression method)
CONSTANT_FIELDS = (
    (1, "version made by"),
    (13, "disk number"),
    (14, "internal attributes"),
    (15, "external attributes"),
)


def _check_torch_constants(constants: Counter, cd: bytes, starts: array, end: _End, problems: list) -> None:
    """The fields of CONSTANT_FIELDS (``constants``: how many entries have each combination of them, counted
    while the entries were checked) and the zip64 end record's versions, as torch writes them."""
    for place, (index, label) in enumerate(CONSTANT_FIELDS):
        values: Counter = Counter()
        for key, n in constants.items():
            values[key[place]] += n
        if len(starts) <= 2 or len(values) == 1:
            continue
        common = max(values, key=values.__getitem__)
        for pos in starts:  # the rare case: a second reading of the directory names the entries that differ
            fields = CENTRAL_HEADER.unpack_from(cd, pos)
            if fields[index] != common:
                name = cd[pos + 46 : pos + 46 + fields[10]].decode("utf-8", "replace")
                problems.append(
                    ZipProblem(
                        "zip.structure",
                        f"central directory {label} {fields[index]:#x} differs from every other entry's {common:#x}",
                        name,
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


@dataclass(slots=True)  # slots, and shared empties below: 200,000 of them are held until the last is checked
class _Entry:
    """One central-directory entry checked against its local header."""

    record: Record
    problems: list[ZipProblem] | tuple
    torch_only: set[int] | frozenset  # ids of the problems that count only in a torch-written file
    padded: bool  # laid out as torch writes a record: a data descriptor, and torch's padding (or no extra field)


PADDING_TAG = struct.pack("<H", PADDING_ID)


def _check_entry(src: Window, size: int, cd: bytes, at: int, constants: Counter) -> _Entry:
    """The record the central-directory entry at ``cd[at:]`` describes, and every way its local header, extra
    fields and data descriptor disagree with it; ``constants`` counts its CONSTANT_FIELDS.  Called once per
    record (200,000 in an optimizer's checkpoint): the common case, where everything agrees, is decided with
    few comparisons."""
    fields = CENTRAL_HEADER.unpack_from(cd, at)
    (_, made, need, flags, method, mtime, mdate, crc, csize, usize, name_len, extra_len) = fields[:12]
    disk, iattr, eattr, offset = fields[13:]
    constants[made, disk, iattr, eattr] += 1
    name_bytes = cd[at + 46 : at + 46 + name_len]
    extra = cd[at + 46 + name_len : at + 46 + name_len + extra_len]
    name = name_bytes.decode("utf-8", "replace")
    problems: list[ZipProblem] = []
    torch_only: set[int] = set()
    big: dict[str, int] = {}
    if 0xFFFFFFFF in (usize, csize, offset):
        wanted = [n for n, v in (("usize", usize), ("csize", csize), ("offset", offset)) if v == 0xFFFFFFFF]
        big = zip64_values(extra, wanted)
        usize, csize, offset = big.get("usize", usize), big.get("csize", csize), big.get("offset", offset)
    if extra and extra_blocks(extra) is None:
        problems.append(ZipProblem("zip.structure", "central directory extra field is malformed", name))
    # one read for the header, its name and (usually) its extra field: torch pads to 64 bytes
    blob = src.pread(LOCAL_HEADER.size + len(name_bytes) + LIKELY_EXTRA, offset)
    if len(blob) < LOCAL_HEADER.size or blob[:4] != LOCAL_MAGIC:
        problems.append(ZipProblem("zip.header-mismatch", f"no local header at offset {offset}", name))
        return _Entry(Record(name, offset, -1, csize, crc, method, truncated=True, end=offset), problems, NONE, False)
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
        l64 = zip64_values(l_extra, [n for n, v in (("usize", l_usize), ("csize", l_csize)) if v == 0xFFFFFFFF])
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
    return _Entry(record, problems or NONE, torch_only or NONE, padded)


NONE = frozenset()  # no problems: one shared empty, not two new containers for each of 200,000 entries


LOCAL_FIELDS = ("version", "flags", "method", "time", "date", "name")


def _check_local_extra(extra: bytes, name: str, problems: list[ZipProblem], torch_only: set[int]) -> None:
    """A local extra field that is not torch's one intact padding block: malformed, damaged padding, or a block
    a torch-written record does not have (judged only if the file turns out to be torch-written)."""
    blocks = extra_blocks(extra)
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
    src: Window, at: int, zip64: bool, expected: tuple[int, int, int], name: str, problems: list[ZipProblem]
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


def read_records(
    path: Path, base: int = 0, length: int | None = None, on_first: FirstRecord | None = None
) -> tuple[list[Record], list[ZipProblem]]:
    return parse_zip(path, base, length, on_first)
