"""A ``torch.save`` file whose tensor bytes are laid out in memory as they will lie in the file: the snapshot of a
step is copied straight into its place, and the file is written from there in one pass.

Why: on a CPU box a background save competes with training for the cores and the memory bus, so every pass
over the bytes that is not the snapshot itself slows the steps it overlaps.  Written through ``live_torch`` a
save of 253 MB read its bytes twice (the digest, then the CRC32 while writing) and copied them once more into
the page cache, from which the kernel wrote them back later.  Here:

* ``plan`` lays the records out in one buffer (the *arena*): record 0's data at 0, each next record's data
  where torch would put it, past room for its local header.  The snapshot copies each tensor into its slot.
* ``copy_in`` copies a tensor into its slot and takes the record's CRC32 and digest leaf in the same pass, each
  L2-sized block hashed while it is still in the cache: the snapshot of a CPU step (``fuse_train``'s
  ``PinnedSnapshot``) costs what the copy alone costs, and the writer has no pass of its own to make.
* ``write`` makes one pass over each record whose hashes it was not given, in L2-sized blocks (its CRC32 and its
  digest leaf together), writes
  the local headers into the gaps the plan left, builds the head (``data.pkl`` with the digest, the small
  records) and the tail (the last small records and the central directory), and writes head, arena and tail
  to the file, with ``O_DIRECT`` where the filesystem takes it (the DMA reads the arena: no copy into the page
  cache and no writeback later), else with plain writes.

The file is a ``torch.save`` file: the records, names, order and 64-byte alignment ``torch.save`` writes; only
record 0's padding is longer (up to a page), so that the arena starts on a page of the file.  A tree that does
not match the plan (a tensor outside the arena, other sizes or order) is declined, nothing written, and the
caller writes it another way.
"""

from __future__ import annotations

import ctypes
import errno
import io
import mmap
import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from ckpttools.digest import DIGEST_ALGORITHM, DIGEST_KEY, _TensorLeaf, tree_digest
from ckpttools.formats.live_torch import _NotPlain, describe
from ckpttools.formats.storage_scan import SCAN_BLOCK
from ckpttools.formats.torch_pickler import pickle_tree
from ckpttools.formats.torchzip import ALIGNMENT, add_head_records, add_tail_records
from ckpttools.formats.zipformat import crc32
from ckpttools.formats.zipwriter import LOCAL_CRC_AT, StoredZipWriter, header_size
from ckpttools.tensors import LazyTensor, tensor_bytes

PAGE = 4096  # O_DIRECT wants the memory, the file offset and the length aligned to the device's block size
ARCHIVE = "archive"
CRC = struct.Struct("<L")


def record_name(key: int) -> str:
    return f"{ARCHIVE}/data/{key}"


@dataclass(frozen=True)
class Plan:
    """Where each record's data lies in the arena (record 0 at 0) and how long the arena is."""

    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    length: int
    # the slots' descriptions, kept for the arena's life (``live_torch.describe``'s ``known``)
    described: dict = field(default_factory=dict, compare=False, repr=False)
    # the local headers ``write`` put in the arena's gaps, by where the arena starts in the file: (the zip
    # entries of records 1..n, where each header's CRC32 lies in the arena).  The gaps are only written there.
    headers: dict = field(default_factory=dict, compare=False, repr=False)


def plan(sizes: list[int] | tuple[int, ...]) -> Plan:
    """The arena for records of ``sizes`` bytes (in record order): each record's data aligned as torch aligns
    it, with room before it for its local header.  (Only the arena as a whole must be page-aligned for
    O_DIRECT, in memory and in the file: the records inside it keep torch's 64, and the file its size.)"""
    offsets, at = [], 0
    for key, size in enumerate(sizes):
        if key:
            at += header_size(record_name(key), size)
            at += -at % ALIGNMENT
        offsets.append(at)
        at += size
    return Plan(tuple(sizes), tuple(offsets), at)


def address(buffer: memoryview) -> int:
    """The memory address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer)) if buffer.nbytes else 0


def write(tree: dict, arena: memoryview, layout: Plan, known: list | None, path: Path) -> bool:
    """Write ``tree`` (a dict of plain values and CPU tensors, each tensor filling its own slot of ``arena``, in
    the tree's order) to ``path`` as a ``torch.save`` file, its digest recorded under ``DIGEST_KEY`` (in
    ``tree`` too).  ``known``: per slot, its (CRC32, digest leaf) as ``copy_in`` took them, or None where the
    pass must take them.  False, nothing written, when the tree does not match ``layout``."""
    arena = arena.cast("B")
    try:
        described, memory = describe(tree, slots(arena, layout), layout.described)
    except _NotPlain:
        return False
    # pickled once, with a stand-in for the digest (known only after the pass) that is patched in afterwards:
    # the same length, so nothing else in the pickle moves
    stand_in = uuid.uuid4().hex
    described[DIGEST_KEY] = {"algorithm": DIGEST_ALGORITHM, "value": stand_in}
    data_pkl, storages = pickle_tree(described)
    if not _matches(storages, memory, arena, layout):
        return False
    if known is None or len(known) != len(storages):
        known = [None] * len(storages)
    crcs, leaves = [], {}
    for ref, offset, hashes in zip(storages, layout.offsets, known, strict=True):
        crc, leaf = hashes or _one_pass(arena[offset : offset + ref.nbytes])
        crcs.append(crc)
        leaves[id(ref)] = leaf
    value = tree_digest(described, _leaf_of(leaves, memory))
    described[DIGEST_KEY] = tree[DIGEST_KEY] = {"algorithm": DIGEST_ALGORITHM, "value": value}
    at = data_pkl.find(stand_in.encode())
    if len(value) == len(stand_in) and at >= 0 and data_pkl.count(stand_in.encode()) == 1:
        data_pkl = data_pkl[:at] + value.encode() + data_pkl[at + len(value) :]
    else:  # (a digest of another length, or the stand-in's bytes met twice: never seen) pickled again
        data_pkl, again = pickle_tree(described)
        if [id(r) for r in again] != [id(r) for r in storages]:
            return False
    head, start, tail = _frame(data_pkl, storages, crcs, arena, layout)
    _write_file(path, head, arena[: layout.length], start, tail)
    return True


def slots(arena: memoryview, layout: Plan):
    """A tensor's bytes when it lies in the arena whole and contiguous (one of its slots), else None: for
    ``live_torch.describe``, which then writes each slot as a storage of its own (not the arena as one)."""
    arena = arena.cast("B")
    base = address(arena)

    def slot(t) -> memoryview | None:
        if t.numel() == 0:  # no bytes, wherever it points (torch gives an empty tensor no address to compare)
            return arena[:0]
        offset, nbytes = t.data_ptr() - base, t.numel() * t.element_size()
        if t.is_contiguous() and 0 <= offset <= layout.length - nbytes:
            return arena[offset : offset + nbytes]
        return None

    return slot


def _matches(storages: list, memory: dict, arena: memoryview, layout: Plan) -> bool:
    """Each storage is its record's slot of the arena, in order."""
    if tuple(ref.nbytes for ref in storages) != layout.sizes or arena.nbytes < layout.length:
        return False
    base = address(arena)
    for ref, offset in zip(storages, layout.offsets, strict=True):
        views = list(memory[id(ref)])
        try:
            if ref.nbytes and (len(views) != 1 or address(views[0].cast("B")) != base + offset):
                return False
        except TypeError:  # a read-only buffer: not one of the arena's slots
            return False
    return True


def _one_pass(data: memoryview, source: int | None = None) -> tuple[int, bytes]:
    """The record's CRC32 and the xxh3-128 of its bytes (the digest leaf), block by block; with ``source`` (a
    memory address), each block is first copied into ``data`` from there (``copy_in``)."""
    crc, h = 0, xxhash.xxh3_128()
    destination = address(data) if source is not None else 0
    for at in range(0, data.nbytes, SCAN_BLOCK):  # L2-sized: the CRC32 and the xxh3 leaf read memory once
        block = data[at : at + SCAN_BLOCK]
        if source is not None:
            ctypes.memmove(destination + at, source + at, block.nbytes)
        crc = crc32(block, crc)
        h.update(block)
    return crc, h.digest()


def copy_in(arena: memoryview, offset: int, source: int, nbytes: int) -> tuple[int, bytes]:
    """Copy ``nbytes`` from memory address ``source`` into the arena at ``offset``, and return what the writer's
    pass would for those bytes: each block is hashed right after it is copied, while it is in the cache (the
    copy reads memory, the hashes do not).  The caller vouches that ``source`` holds ``nbytes`` readable bytes
    that do not change meanwhile (a CPU tensor's, contiguous, not conjugated or negated).  No GIL is held for
    the bytes: ``memmove``, ISA-L's CRC32 and xxh3 all release it, so several threads copy at once."""
    return _one_pass(arena[offset : offset + nbytes], source)


def _leaf_of(leaves: dict, memory: dict):
    """The digest's view of a described tensor: the leaf hashed in the pass when the tensor is its whole
    storage (every tensor of a snapshot is), else hashed from its bytes."""

    def leaf(value: Any) -> _TensorLeaf | None:
        if not isinstance(value, LazyTensor):
            return None
        ref = value.storage
        whole = value.storage_offset == 0 and value.is_contiguous_view() and value.nbytes == ref.nbytes
        if whole:
            return _TensorLeaf(value.dtype, value.shape, lambda: (), leaves[id(ref)])
        return _TensorLeaf(value.dtype, value.shape, lambda: tensor_bytes(value, memory[id(ref)]))

    return leaf


def _frame(data_pkl: bytes, storages: list, crcs: list[int], arena: memoryview, layout: Plan):
    """(the head's bytes, the arena's offset in the file, the tail's bytes); the local headers of records 1..n
    are written into the arena's gaps."""
    head = io.BytesIO()
    zw = StoredZipWriter(head, ALIGNMENT)
    add_head_records(zw, data_pkl, ARCHIVE)
    if not storages:  # nothing to place: the rest as write_torch_zip writes it
        whole = _finish(zw, head, data_pkl)
        return whole, len(whole), b""
    first = head.tell() + header_size(record_name(0), layout.sizes[0])
    start = first + (-first % PAGE)  # the arena starts on a page of the file (record 0's header padded to it)
    head.write(zw.add_placed(record_name(0), layout.sizes[0], crcs[0], head.tell(), start - head.tell()))
    placed = layout.headers.get(start)
    if placed is None:
        entries, crc_at = [], []
        for key in range(1, len(storages)):
            gap_from = layout.offsets[key - 1] + layout.sizes[key - 1]
            length = layout.offsets[key] - gap_from
            header = zw.add_placed(record_name(key), layout.sizes[key], crcs[key], start + gap_from, length)
            arena[gap_from : layout.offsets[key]] = header
            entries.append(zw.entries[-1])
            crc_at.append(gap_from + LOCAL_CRC_AT)
        layout.headers.clear()  # the gaps now hold these headers (offsets in the file differ with ``start``)
        layout.headers[start] = (entries, crc_at)
    else:  # the same headers as the last save but their CRC32s (2,000 records: ms of the writer's GIL-held time)
        for entry, at, crc in zip(*placed, crcs[1:], strict=True):
            entry.crc = crc
            CRC.pack_into(arena, at, crc)
        zw.entries.extend(placed[0])
    tail = io.BytesIO()
    zw.continue_at(tail, start + layout.length)
    return head.getvalue(), start, _finish(zw, tail, data_pkl)


def _finish(zw: StoredZipWriter, out: io.BytesIO, data_pkl: bytes) -> bytes:
    """The records after the storages and the central directory, as ``torchzip.write_torch_zip`` writes them."""
    add_tail_records(zw, data_pkl, ARCHIVE)
    zw.close()
    return out.getvalue()


def _write_file(path: Path, head: bytes, body: memoryview, start: int, tail: bytes) -> None:
    """head at 0, body at ``start``, tail after it: with O_DIRECT where the pieces are aligned and the
    filesystem allows it, else plain writes."""
    aligned = start % PAGE == 0 and address(body) % PAGE == 0 and hasattr(os, "O_DIRECT")
    if aligned:
        try:
            _write_direct(path, head, body, start, tail)
            return
        except OSError as exc:  # a filesystem without O_DIRECT (tmpfs, some network ones): the plain way
            if exc.errno != errno.EINVAL:
                raise
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for data, at in ((head, 0), (body, start), (tail, start + body.nbytes)):
            _pwrite_all(fd, memoryview(data), at)
    finally:
        os.close(fd)


def _write_direct(path: Path, head: bytes, body: memoryview, start: int, tail: bytes) -> None:
    whole = body.nbytes - body.nbytes % PAGE
    end = start + body.nbytes + len(tail)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        with _page_buffer(head) as first:
            _pwrite_all(fd, first, 0)
        for at in range(0, whole, 64 << 20):
            _pwrite_all(fd, body[at : min(whole, at + (64 << 20))], start + at)
        with _page_buffer(bytes(body[whole:]) + tail) as last:
            _pwrite_all(fd, last, start + whole)
        os.ftruncate(fd, end)  # the last page's padding goes
    finally:
        os.close(fd)


class _page_buffer:  # noqa: N801 - a context manager used like a function
    """``data`` in page-aligned memory, padded with zeros to whole pages (what O_DIRECT writes from)."""

    def __init__(self, data: bytes):
        self.map = mmap.mmap(-1, max(PAGE, len(data) + (-len(data) % PAGE)))
        self.map[: len(data)] = data

    def __enter__(self) -> memoryview:
        self.view = memoryview(self.map)
        return self.view

    def __exit__(self, *exc) -> None:
        self.view.release()
        self.map.close()


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    while data.nbytes:
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n
