"""Checkpoint saves that do not stall training: the training thread takes a snapshot, a background thread writes it.

The snapshot is of the step being saved (so a resume stays exact): on CUDA the tensors are copied with
``non_blocking=True`` into pinned CPU buffers that are reused from save to save, and a CUDA event marks when the
copies are done (the writer waits on it, the training thread does not); on CPU they are copied into reused
buffers too. For ``.pt`` saves the buffers are the slots of one arena laid out as the file
(``ckpttools.formats.zipimage``), which the writer writes as it is, with the same crash-safe steps as a
synchronous save (staged temporary, copies, previous ``last.pt`` kept, rename, fsync).  On CPU the larger tensors
are hashed as they are copied (each record's CRC32 and digest leaf, while its bytes are in the cache), so the
writer makes no pass over them of its own. At most one save is in
flight: a new one first waits for the previous. ``wait()`` (before a resumable interrupt save, at the end of a
run) returns once the file is whole, and raises what the writer raised.

A ``kill -9`` while the writer works leaves the previous ``last.pt`` untouched: nothing is renamed before the
new file is complete and fsynced.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ckpttools.formats import zipimage


class PinnedSnapshot:
    """Copies of a checkpoint tree's tensors in CPU buffers that are reused from save to save (already faulted
    in: a copy into them runs at memory speed); on CUDA the buffers are pinned and filled asynchronously.

    ``file_image``: the buffers are the slots of one arena laid out as the ``.pt`` file will be
    (``ckpttools.formats.zipimage``), so the writer writes the file from the snapshot itself, with no second
    copy (``image``).  DCP saves keep separate buffers: its writer saves each tensor's whole storage."""

    def __init__(self, file_image: bool = False) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.pending_device_copies = False
        self.file_image = file_image
        self.arena: torch.Tensor | None = None
        self.layout: zipimage.Plan | None = None
        self._placed: tuple | None = None  # what the arena was planned for
        # while the arena's plan holds: the buffers in the tree's order, and their indices per source device
        self._reused: tuple[list, dict] | None = None
        # per slot of the arena, (CRC32, digest leaf) of what the last ``take`` copied into it, or None where the
        # writer's pass takes them (``zipimage.write``'s ``known``)
        self.hashes: list | None = None
        self._copiers: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool) for ``_copy_hashing``

    def take(self, tree: Any) -> Any:
        """The tree with every tensor replaced by its buffer, filled by one batched copy per source device
        (``torch._foreach_copy_``: a few hundred small tensors cost one dispatch, not one each); on CPU into the
        arena, the larger tensors by ``_copy_hashing`` instead."""
        tensors: list[tuple[str, torch.Tensor]] = []
        _walk(tree, "", tensors)  # once: the arena's plan, the buffers and the copy all follow this order
        if self.file_image and self._place(tensors) and self._reused is not None:
            # the same tensors as last time: the buffers and their grouping are known (a few ms of Python per
            # save at 2,000 tensors, all of it time the training thread stands still)
            buffers, groups = self._reused
        else:
            buffers = [self._buffer(path, t) for path, t in tensors]
            groups = {}
            for i, (_, t) in enumerate(tensors):
                groups.setdefault(t.device, []).append(i)
            if self.file_image:
                self._reused = (buffers, groups)
        self.pending_device_copies, self.hashes = False, None
        copying: list = []  # ``_copy_hashing``'s copies in flight
        try:
            with torch.no_grad():  # the sources may require grad: the copy is data, not a step autograd records
                for device, at in groups.items():
                    if device.type == "cpu" and self.arena is not None:
                        at = self._copy_hashing(tensors, buffers, at, copying)
                    cuda = device.type == "cuda"
                    if at:
                        torch._foreach_copy_([buffers[i] for i in at], [tensors[i][1] for i in at], non_blocking=cuda)
                    self.pending_device_copies |= cuda
        finally:
            self._collect_hashes(copying)  # no copy outlives take(), whatever stopped it
        return _replace(tree, iter(buffers))

    @property
    def image(self) -> tuple[memoryview, zipimage.Plan, list | None] | None:
        """The arena, its plan and the hashes taken with the copy, for ``zipimage.write`` (None without
        ``file_image``)."""
        if self.arena is None or self.layout is None:
            return None
        return memoryview(self.arena.numpy()), self.layout, self.hashes

    def _copy_hashing(self, tensors: list, buffers: list, at: list[int], copying: list) -> list[int]:
        """Start copying the CPU tensors at ``at`` that fill an arena slot of at least ``HASHED_COPY_MIN`` bytes
        with ``zipimage.copy_in`` on a few threads (each record's hashes taken as its bytes are copied: the
        copy reads memory, the hashes read the cache), their futures added to ``copying``; return the indices
        left to the batched copy."""
        base, offsets = self.arena.data_ptr(), self.layout.offsets
        arena = memoryview(self.arena.numpy())
        jobs, rest = [], []
        for i in at:
            t = tensors[i][1]
            nbytes = t.numel() * t.element_size()
            if nbytes >= HASHED_COPY_MIN and _plain_bytes(t) and buffers[i].data_ptr() == base + offsets[i]:
                jobs.append((nbytes, i, t.data_ptr()))
            else:
                rest.append(i)
        if jobs:
            # as many threads as training's own (a CPU run uses every core), at most 4: the copy is memory-bound
            workers = max(1, min(4, torch.get_num_threads(), os.cpu_count() or 1))
            if self._copiers is None or self._copiers[0] != workers:
                self._copiers = (workers, ThreadPoolExecutor(workers, thread_name_prefix="snapshot-copy"))
            pool = self._copiers[1]
            copying.extend(pool.submit(_copy_run, arena, offsets, run) for run in _balanced(jobs, workers))
        return rest

    def _collect_hashes(self, copying: list) -> None:
        """Wait for ``_copy_hashing``'s copies; their hashes become ``self.hashes``."""
        if not copying:
            return
        hashes: list = [None] * len(self.layout.sizes)
        for job in copying:
            for i, found in job.result():
                hashes[i] = found
        self.hashes = hashes

    def _place(self, tensors: list[tuple[str, torch.Tensor]]) -> bool:
        """Lay the tensors out in one arena in the order the file will hold them (the tree's order); kept while
        every tensor keeps its path, shape, dtype and device.  True when the arena already fitted them."""
        placed = tuple((path, tuple(t.shape), t.dtype, t.device) for path, t in tensors)
        if placed == self._placed:
            return True
        self.buffers.clear()
        self._reused = None
        self.arena = self.layout = None  # the old arena goes before the new one is allocated
        layout = zipimage.plan([t.numel() * t.element_size() for _, t in tensors])
        pinned = any(t.device.type == "cuda" for _, t in tensors)
        raw = torch.empty(layout.length + zipimage.PAGE, dtype=torch.uint8, pin_memory=pinned)
        skip = -raw.data_ptr() % zipimage.PAGE  # page-aligned: what O_DIRECT writes from
        arena = raw[skip : skip + layout.length]
        for (path, t), offset in zip(tensors, layout.offsets, strict=True):
            slot = arena[offset : offset + t.numel() * t.element_size()]
            try:
                self.buffers[path] = slot.view(t.dtype).view(t.shape)
            except RuntimeError:  # a dtype no byte buffer can be viewed as: its own buffer (the writer then
                pass  # declines the arena and the file is written the usual way)
        self.arena, self.layout, self._placed = arena, layout, placed
        return False

    def _buffer(self, path: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor's reused buffer (made when its shape or dtype changed)."""
        cuda = tensor.device.type == "cuda"
        buf = self.buffers.get(path)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = self.buffers[path] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
        return buf


# Tensors of at least this many bytes are copied into the arena with their hashes (``zipimage.copy_in``); the
# smaller ones, in one batched torch copy, their hashes taken by the writer (per tensor, Python would cost more
# than their bytes).  Scale s: 1,890 tensors, of which the 296 from 64 KiB up hold 99.2 % of the bytes.
HASHED_COPY_MIN = 64 << 10


def _plain_bytes(t: torch.Tensor) -> bool:
    """Are the tensor's values its memory, byte for byte from ``data_ptr()``?  (Not for a strided view, a
    conjugated or negated view, a sparse or quantized tensor, or a subclass that keeps its data elsewhere.)"""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
        and not t.is_quantized
    )


def _copy_run(arena: memoryview, offsets: tuple[int, ...], run: list) -> list[tuple[int, tuple[int, bytes]]]:
    """One thread's share of ``_copy_hashing``: (slot, its hashes) for each (bytes, slot, source address)."""
    return [(i, zipimage.copy_in(arena, offsets[i], source, nbytes)) for nbytes, i, source in run]


def _balanced(jobs: list[tuple[int, int, int]], workers: int) -> list[list]:
    """``jobs`` (bytes first) split into ``workers`` runs of about the same bytes: the largest first, each to
    the run with the fewest bytes so far."""
    runs: list[list] = [[] for _ in range(workers)]
    loads = [0] * workers
    for job in sorted(jobs, reverse=True):
        k = loads.index(min(loads))
        runs[k].append(job)
        loads[k] += job[0]
    return [r for r in runs if r]


def _walk(tree: Any, path: str, found: list) -> None:
    """(path, tensor) of every tensor in ``tree``, depth first: the order ``_replace`` puts buffers back in."""
    if isinstance(tree, torch.Tensor):
        found.append((path, tree))
    elif isinstance(tree, dict):
        for k, v in tree.items():
            _walk(v, f"{path}/{k!r}", found)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _walk(v, f"{path}[{i}]", found)


def _replace(tree: Any, buffers) -> Any:
    """``tree`` with its tensors replaced, in ``_walk``'s order, by the next of ``buffers`` (containers rebuilt
    as dicts, lists and tuples)."""
    if isinstance(tree, torch.Tensor):
        return next(buffers)
    if isinstance(tree, dict):
        return {k: _replace(v, buffers) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_replace(v, buffers) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_replace(v, buffers) for v in tree)
    return tree


def _set_priority(native_id: int | None, nice: int) -> None:
    """Linux: nice applies per thread (elsewhere nothing changes)."""
    if native_id is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, native_id, nice)
    except (AttributeError, OSError):  # not Linux, or the thread has just ended
        pass


# The writer's niceness.  At first it takes only what training leaves (nice 19): on a CPU box the training
# threads use every core, and a writer competing with them as an equal slows every parallel region.  But saves
# so frequent that one arrives while the last is still being written mean the starved writer is falling behind,
# and training then waits for it: from then on it gets a fair share (nice 0).  Measured, scale s on 2 cores
# (bench/save_bench.py --modes none,async): a save every 4 steps cost 0.39-0.49 s each at nice 19 (0.25 s of it
# training stalled) against 0.20-0.24 s at nice 0-5; a save every 10 steps 0.20 s at nice 19, 0.26 at nice 0.
STARVED_NICE, FAIR_NICE = 19, 0


class AsyncSaver:
    """Runs ``write(snapshot)`` on a background thread, one at a time."""

    def __init__(self, snapshot: PinnedSnapshot | None = None):
        self.snapshot = snapshot or PinnedSnapshot()
        self._thread: threading.Thread | None = None
        self._writer_id: int | None = None
        self._nice = STARVED_NICE
        self._error: BaseException | None = None

    def submit(self, tree: Any, write: Callable[[Any], None]) -> None:
        """Snapshot ``tree`` now (the step being saved) and run ``write(snapshot)`` in the background."""
        if self.busy:  # the writer is falling behind the saves: give it a fair share from now on
            self._nice = FAIR_NICE
        self.wait()  # one save in flight at most; pinned buffers are reused only once the last write is done
        copy = self.snapshot.take(tree)
        ready = torch.cuda.Event() if self.snapshot.pending_device_copies else None
        if ready is not None:
            ready.record()
        # The tree's tensors (detached views of the parameters and optimizer state, a few thousand Python
        # objects) are let go on the writer's thread: freeing a tensor waits for the GIL, and on the training
        # thread each of them waited while the writer pickled (30 ms a save at scale s, on CPU).
        held = [tree]

        def run() -> None:
            self._writer_id = threading.get_native_id()
            _set_priority(self._writer_id, self._nice)
            try:
                if ready is not None:
                    ready.synchronize()  # the device-to-host copies are done
                write(copy)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread at the next wait()
                self._error = exc
            finally:
                held.clear()

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            if self._thread.is_alive():  # training waits for this write now
                _set_priority(self._writer_id, FAIR_NICE)
            self._thread.join()
            self._thread = None
            self._writer_id = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
