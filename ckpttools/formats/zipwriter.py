"""A writer of stored (uncompressed) zip archives, as ``torch.save`` lays them out: each record's data aligned to
64 bytes by torch's "FB" padding field, zip64 fields where a size, an offset or the record count needs them.

Why not ``zipfile``: it computes each record's CRC32 with zlib's (about 2 GB/s here); this one uses ISA-L's
(``ziprecords.crc32``, several times faster and, like the file's ``write``, releasing the GIL on large buffers).
Local headers are those ``zipfile`` writes for the same calls; the central directory carries no padding field,
as torch's carries none (a test reads the archives back with ``zipfile``, torch and our reader); the output must
be seekable (each local header's CRC is filled in once its data is written).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

from ckpttools.formats.zipformat import (
    CENTRAL_MAGIC,
    EOCD_MAGIC,
    LOCAL_MAGIC,
    PADDING_ID,
    TORCH_ZIP64_VERSIONS,
    ZIP64_EOCD_MAGIC,
    ZIP64_LOCATOR_MAGIC,
    crc32,
)

ZIP64_LIMIT = (1 << 31) - 1  # zipfile's rule for a local header: sizes past this get its zip64 field
CENTRAL_LIMIT = 0xFFFFFFFE  # torch's rule for the directory: sizes and offsets past this get zip64 fields
COUNT_LIMIT = 0xFFFF  # records the classic end record can count
VERSION, ZIP64_VERSION = 20, 45  # "version needed to extract"
DOS_DATE_1980 = 33  # 1980-01-01 00:00, what zipfile writes for ZipInfo defaults
# "version made by" and the attributes: 0, as torch writes them, so that `ckpt repair` rebuilding a lost directory
# (which assumes torch's constants when no entry survives) gives the file back bit for bit
SMALL_RECORD = 1 << 20  # records up to this size are held whole while written (no seek back to the header)
TINY_RECORD = 4096  # ... and up to this size joined to their header for a single write
LOCAL = struct.Struct("<4s2B4HL2L2H")
LOCAL_CRC_AT = struct.calcsize("<4s2B4H")  # where the CRC32 lies in a local header
CENTRAL = struct.Struct("<4s4B4HL2L5H2L")


@dataclass
class _Entry:
    name: bytes
    flags: int
    offset: int
    size: int = 0
    crc: int = 0
    padding: bytes = b""

    @property
    def zip64_sizes(self) -> bool:
        return _zip64_sizes(self.size)


def _zip64_sizes(size: int) -> bool:
    return size * 1.05 > ZIP64_LIMIT  # decided before the data is written, as zipfile decides


def _header_size(raw_name: bytes, size: int) -> int:
    return LOCAL.size + len(raw_name) + (20 if _zip64_sizes(size) else 0) + 4  # + the padding field's own header


def _encoded(name: str) -> tuple[bytes, int]:
    """The name's bytes and the flag that says UTF-8."""
    return (name.encode("ascii"), 0) if name.isascii() else (name.encode("utf-8"), 0x800)


def header_size(name: str, size: int) -> int:
    """The smallest local header of a record (its padding field empty): what a record placed by the caller
    (``add_placed``) must leave room for before its data."""
    return _header_size(_encoded(name)[0], size)


class StoredZipWriter:
    def __init__(self, out: IO[bytes], alignment: int = 64, origin: int = 0):
        """``origin``: the offset in the archive of ``out``'s current position (0: the archive starts here)."""
        self.out, self.alignment, self.entries = out, alignment, []
        self.continue_at(out, origin)

    def continue_at(self, out: IO[bytes], origin: int) -> None:
        """Go on writing into ``out``, whose current position is the archive's offset ``origin`` (an archive
        written in pieces, see ``zipimage``)."""
        self.out = out
        self.base = out.tell() - origin  # out.tell() - base: an offset in the archive, counted from its start

    def add(self, name: str, chunks: Iterable, size: int, on_bytes: Callable[[int], None] | None = None) -> int:
        """One record of ``size`` bytes from ``chunks`` (bytes-like); returns the bytes written."""
        raw, flags = _encoded(name)
        start = self.out.tell() - self.base
        entry = _Entry(raw, flags, start, size)
        header = _header_size(raw, size)
        pad = (-(start + header)) % self.alignment  # aligned in the file, as torch's mmap load needs
        entry.padding = struct.pack("<HH", PADDING_ID, pad) + b"Z" * pad
        if size <= SMALL_RECORD:  # its CRC goes into the header at once (no seek back per record: a checkpoint
            blocks = [memoryview(c).cast("B") for c in chunks]  # of 200,000 small tensors is 200,000 records)
            crc, written = 0, 0
            for block in blocks:  # the chunks themselves, not a joined copy: most of a model's bytes are here
                crc = crc32(block, crc)
                written += block.nbytes
            entry.crc, entry.size = crc, written
            header = self._local_header(entry)
            if len(blocks) == 1 and written <= TINY_RECORD:
                self.out.write(header + blocks[0])  # one call for the many tiny ones
            else:
                self.out.write(header)
                for block in blocks:
                    self.out.write(block)
            if on_bytes and written:
                on_bytes(written)
        else:
            self._add_streamed(entry, chunks, on_bytes)
        self.entries.append(entry)
        return entry.size

    def add_placed(self, name: str, size: int, crc: int, offset: int, length: int) -> bytes:
        """The local header of a record whose data the caller puts in place: ``length`` bytes exactly (the
        padding field takes what the smallest header leaves), to lie at ``offset`` in the archive."""
        raw, flags = _encoded(name)
        pad = length - _header_size(raw, size)
        if not 0 <= pad <= 0xFFFF:
            raise ValueError(f"{name}: no header of {length} bytes (padding {pad})")
        entry = _Entry(raw, flags, offset, size, crc, struct.pack("<HH", PADDING_ID, pad) + b"Z" * pad)
        self.entries.append(entry)
        return self._local_header(entry)

    def _add_streamed(self, entry: _Entry, chunks: Iterable, on_bytes: Callable[[int], None] | None) -> None:
        self.out.write(self._local_header(entry))
        crc, written = 0, 0
        for block in chunks:
            crc = crc32(block, crc)
            self.out.write(block)
            n = memoryview(block).nbytes
            written += n
            if on_bytes:
                on_bytes(n)
        entry.crc, entry.size = crc, written
        end = self.out.tell()
        self.out.seek(self.base + entry.offset)
        self.out.write(self._local_header(entry))  # now with its CRC (the length is unchanged)
        self.out.seek(end)

    def _local_header(self, e: _Entry) -> bytes:
        extra = e.padding
        if e.zip64_sizes:
            extra += struct.pack("<HHQQ", 1, 16, e.size, e.size)
            sizes, version = (0xFFFFFFFF, 0xFFFFFFFF), ZIP64_VERSION
        else:
            sizes = (e.size, e.size)
            version = ZIP64_VERSION if e.offset > CENTRAL_LIMIT else VERSION  # as its central entry will say
        fields = (LOCAL_MAGIC, version, 0, e.flags, 0, 0, DOS_DATE_1980, e.crc, *sizes, len(e.name), len(extra))
        return LOCAL.pack(*fields) + e.name + extra

    def close(self) -> None:
        """The central directory and end records (zip64 ones where needed)."""
        start = self.out.tell() - self.base
        for e in self.entries:
            values = [e.size, e.size] if e.size > CENTRAL_LIMIT else []
            if e.offset > CENTRAL_LIMIT:
                values.append(e.offset)
            zip64 = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""
            extra = zip64  # the padding lives in the local header only, as torch writes it (and a damaged
            # byte of the central directory then always lands in a field the reader checks)
            sizes = (0xFFFFFFFF, 0xFFFFFFFF) if e.size > CENTRAL_LIMIT else (e.size, e.size)
            version = ZIP64_VERSION if (values or e.zip64_sizes) else VERSION
            offset = 0xFFFFFFFF if e.offset > CENTRAL_LIMIT else e.offset
            self.out.write(
                CENTRAL.pack(
                    CENTRAL_MAGIC,
                    0,  # version made by: 0, as torch writes it
                    0,
                    version,
                    0,
                    e.flags,
                    0,
                    0,
                    DOS_DATE_1980,
                    e.crc,
                    *sizes,
                    len(e.name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    offset,
                )
                + e.name
                + extra
            )
        size, count = self.out.tell() - self.base - start, len(self.entries)
        if count > COUNT_LIMIT or start > CENTRAL_LIMIT or size > CENTRAL_LIMIT:
            at = self.out.tell() - self.base
            self.out.write(
                struct.pack("<4sQ2H2L4Q", ZIP64_EOCD_MAGIC, 44, *TORCH_ZIP64_VERSIONS, 0, 0, count, count, size, start)
            )
            self.out.write(struct.pack("<4sLQL", ZIP64_LOCATOR_MAGIC, 0, at, 1))
        self.out.write(
            struct.pack(
                "<4s4H2LH",
                EOCD_MAGIC,
                0,
                0,
                *(2 * [count if count <= COUNT_LIMIT else 0xFFFF]),  # past a limit: the sentinel, as zipfile
                size if size <= CENTRAL_LIMIT else 0xFFFFFFFF,
                start if start <= CENTRAL_LIMIT else 0xFFFFFFFF,
                0,
            )
        )
