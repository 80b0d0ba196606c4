"""The zip format's pieces every zip reader here shares: the header layouts, a record and a problem, CRC32, reads
of a byte range, and a record's bytes streamed (stored or deflated, bounded memory).  ``ziprecords`` parses and
checks a whole archive with them, ``ziprecover`` finds records again where the directory is damaged.
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref
import zlib
from array import array
from collections.abc import Iterable, Iterator, MutableMapping
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
TORCH_ZIP64_VERSIONS = (0x031E, 45)  # what torch's writer (miniz) puts in the zip64 end record


class ZipStructureError(Exception):
    """The zip's end records are gone; ``records`` holds what a local-header scan could still find."""

    def __init__(self, message: str, records: list[Record]):
        super().__init__(message)
        self.records = records


@dataclass(slots=True)  # slots: an optimizer's checkpoint may hold 200,000 records (100 bytes less each)
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


class RecordTable(MutableMapping):
    """A zip's records by name, the plain ones held as columns.

    A checkpoint of 200,000 tensors is 200,000 records: as Record objects (each with four integers of its own)
    they were the largest part of what a reader holds, and of ``ckpt diff``'s peak, which holds two files.  Here
    a plain record (stored, whole, named alike in its local header) is five integers in arrays and a Record is
    made when one is asked for: records compare equal, never identical (``is``).  The rest, and every record
    assigned after the table is built, are kept as the objects given.  Iteration keeps the order records were
    added in."""

    def __init__(self, records: Iterable[Record] = ()):
        self._at: dict[str, int] = {}  # every name, in order -> the row of a plain record, -1 for the others
        self._rows = tuple(array("q") for _ in range(5))  # header_offset, data_offset, size, crc (-1: None), end
        self._other: dict[str, Record] = {}
        header, data, size, crc, end = (column.append for column in self._rows)
        for r in records:
            if r.name in self._at:
                continue  # the first of a name, as a sequential reader sees it; duplicates are errors elsewhere
            if r.method or r.truncated or r.local_name is not None or r.compressed is not None:
                self[r.name] = r
                continue
            row = len(self._rows[0])
            try:
                header(r.header_offset), data(r.data_offset), size(r.size), end(r.end)
                crc(-1 if r.crc is None else r.crc)
            except OverflowError:  # past what a signed 64-bit column holds (a hostile zip64 field): as it is
                for column in self._rows:
                    del column[row:]
                self[r.name] = r
                continue
            self._at[r.name] = row

    def __getitem__(self, name: str) -> Record:
        if self._other and name in self._other:
            return self._other[name]
        i, rows = self._at[name], self._rows
        crc = rows[3][i]
        return Record(name, rows[0][i], rows[1][i], rows[2][i], crc if crc >= 0 else None, 0, False, rows[4][i])

    def get(self, name: str, default=None):
        return self[name] if name in self._at else default  # without Mapping.get's exception handling

    def __setitem__(self, name: str, record: Record) -> None:
        self._other[name] = record  # kept as given (and found before the row of the same name, if any)
        self._at.setdefault(name, -1)  # its place in the order

    def __delitem__(self, name: str) -> None:
        del self._at[name]
        self._other.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._at

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)


@dataclass
class ZipProblem:
    code: str
    message: str
    where: str


def crc32(data, value: int = 0) -> int:
    return _crc32(data, value)


FOLIO = 2 << 20  # the largest page-cache folio a read through a mapping may map


class MappedReads:
    """Small reads scattered over a read-only memory map, with the process's RSS kept flat.

    A read maps the page cache's whole folio around it (up to 2 MiB on recent kernels, when the file was read
    from disk with large readahead): a local header per record of a 2 GiB file held 300 MB of RSS until the map
    closed.  After ``FAR_READS_KEPT`` reads more than a folio apart, the mapping's pages are dropped (the page
    cache keeps them); contiguous reads (a zip's directory, adjacent small records) never count."""

    FAR_READS_KEPT = 4

    def __init__(self, mm: mmap.mmap):
        self.mm, self._last, self._far = mm, 0, 0

    def read(self, start: int, end: int) -> bytes:
        if abs(start - self._last) > FOLIO:
            self._far += 1
            if self._far > self.FAR_READS_KEPT:
                self.mm.madvise(mmap.MADV_DONTNEED)
                self._far = 0
        self._last = start
        return self.mm[start:end]


class Window:
    """Reads of a byte range of a file, addressed from the range's start (a zip embedded in a DCP file).
    Through a read-only memory map where the file can be mapped (a slice, no system call: a zip of 200,000
    records is a million small reads), else ``os.pread``."""

    def __init__(self, fd: int, base: int, size: int, mapped: bool = False):
        self.fd, self.base, self.size = fd, base, size
        self.map: mmap.mmap | None = None
        self.reads: MappedReads | None = None
        if mapped:  # for many small scattered reads only
            try:
                self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                self.reads = MappedReads(self.map)
            except (OSError, ValueError):  # an empty file, a file system that cannot map
                self.map = None

    def pread(self, n: int, offset: int) -> bytes:
        n = min(n, self.size - offset)
        if n <= 0 or offset < 0:
            return b""
        if self.reads is not None:
            start = self.base + offset
            return self.reads.read(start, start + n)
        return os.pread(self.fd, n, self.base + offset)

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = self.reads = None


def extra_blocks(extra: bytes) -> list[tuple[int, bytes]] | None:
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


def zip64_values(extra: bytes, wanted: list[str]) -> dict[str, int]:
    """Zip64 extended information: 8-byte values for the fields whose 32-bit copy is 0xFFFFFFFF, in order."""
    for tag, data in extra_blocks(extra) or []:
        if tag == 0x0001:
            out, pos = {}, 0
            for name in wanted:
                if pos + 8 <= len(data):
                    out[name] = struct.unpack_from("<Q", data, pos)[0]
                    pos += 8
            return out
    return {}


def find_eocd(src: Window, size: int) -> int | None:
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
