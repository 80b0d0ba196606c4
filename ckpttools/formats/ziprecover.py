"""Zip records found again without a usable central directory: a walk over the local headers (a truncated file),
a record's bytes located where only the metadata around them is damaged, and the directory rebuilt from the
local headers for ``ckpt repair``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ckpttools.formats.zipformat import (
    CENTRAL_HEADER,
    CENTRAL_MAGIC,
    CHUNK,
    DESCRIPTOR_MAGIC,
    EOCD,
    LOCAL_HEADER,
    LOCAL_MAGIC,
    ZIP64_EOCD,
    ZIP64_EOCD_MAGIC,
    ZIP64_LOCATOR,
    ZIP64_LOCATOR_MAGIC,
    Record,
    Window,
    find_eocd,
    record_crc,
)


def scan_local_headers(path: Path, base: int = 0, length: int | None = None) -> list[Record]:
    """Walk the file from the start, record by record, without the central directory (for damaged files).

    torch writes data descriptors after each record's data (flag bit 3), so a record ends where a descriptor
    signature is followed by a size equal to the bytes since the data started."""
    records: list[Record] = []
    size = path.stat().st_size - base if length is None else length
    fd = os.open(path, os.O_RDONLY)
    src = Window(fd, base, size)
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


def _find_descriptor(src: Window, data_offset: int, size: int) -> tuple[int, int, int] | None:
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
        src = Window(fd, 0, size)
        eocd_at = find_eocd(src, size)
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


def _central_entry(src: Window, r: Record, template: tuple[int, int, int, int]) -> bytes:
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
