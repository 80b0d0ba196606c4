"""Checkpoint saves that do not stall training: the training thread takes a snapshot, a background thread writes it.

The snapshot is of the step being saved (so a resume stays exact): on CUDA the tensors are copied with
``non_blocking=True`` into pinned CPU buffers that are reused from save to save, and a CUDA event marks when the
copies are done (the writer waits on it, the training thread does not); on CPU they are copied into reused
buffers too. For ``.pt`` saves the buffers are the slots of one arena laid out as the file
(``ckpttools.formats.zipimage``), which the writer hashes and writes as it is, with the same crash-safe steps as
a synchronous save (staged temporary, copies, previous ``last.pt`` kept, rename, fsync). At most one save is in
flight: a new one first waits for the previous. ``wait()`` (before a resumable interrupt save, at the end of a
run) returns once the file is whole, and raises what the writer raised.

A ``kill -9`` while the writer works leaves the previous ``last.pt`` untouched: nothing is renamed before the
new file is complete and fsynced.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
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
        # while the arena's plan holds: the buffers in the tree's order, and the copy's pairs per source device
        self._reused: tuple[list, dict] | None = None

    def take(self, tree: Any) -> Any:
        """The tree with every tensor replaced by its buffer, filled by one batched copy per source device
        (``torch._foreach_copy_``: a few hundred small tensors cost one dispatch, not one each)."""
        tensors: list[tuple[str, torch.Tensor]] = []
        _walk(tree, "", tensors)  # once: the arena's plan, the buffers and the copy all follow this order
        if self.file_image and self._place(tensors) and self._reused is not None:
            # the same tensors as last time: the buffers and their grouping are known (a few ms of Python per
            # save at 2,000 tensors, all of it time the training thread stands still)
            buffers, groups = self._reused
            pairs = {d: ([buffers[i] for i in at], [tensors[i][1] for i in at]) for d, at in groups.items()}
        else:
            pairs = {}
            buffers = [self._buffer(path, t, pairs) for path, t in tensors]
            if self.file_image:
                groups: dict[torch.device, list[int]] = {}
                for i, (_, t) in enumerate(tensors):
                    groups.setdefault(t.device, []).append(i)
                self._reused = (buffers, groups)
        self.pending_device_copies = False
        with torch.no_grad():  # the sources may require grad: the copy is data, not a step autograd records
            for device, (dsts, srcs) in pairs.items():
                cuda = device.type == "cuda"
                torch._foreach_copy_(dsts, srcs, non_blocking=cuda)
                self.pending_device_copies |= cuda
        return _replace(tree, iter(buffers))

    @property
    def image(self) -> tuple[memoryview, zipimage.Plan] | None:
        """The arena and its plan, for ``zipimage.write`` (None without ``file_image``)."""
        if self.arena is None or self.layout is None:
            return None
        return memoryview(self.arena.numpy()), self.layout

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

    def _buffer(self, path: str, tensor: torch.Tensor, pairs: dict) -> torch.Tensor:
        """The tensor's reused buffer (made when its shape or dtype changed), its copy queued in ``pairs``."""
        cuda = tensor.device.type == "cuda"
        buf = self.buffers.get(path)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = self.buffers[path] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
        dsts, srcs = pairs.setdefault(tensor.device, ([], []))
        dsts.append(buf)
        srcs.append(tensor)
        return buf


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

        def run() -> None:
            self._writer_id = threading.get_native_id()
            _set_priority(self._writer_id, self._nice)
            try:
                if ready is not None:
                    ready.synchronize()  # the device-to-host copies are done
                write(copy)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread at the next wait()
                self._error = exc

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
