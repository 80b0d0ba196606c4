"""``--save-format dcp``: checkpoints as ``torch.distributed.checkpoint`` folders, written by ``dcp.async_save``.

Every rank calls ``submit`` at the same step.  The state is staged to CPU memory before ``async_save``
returns (by ``SnapshotStager``: buffers reused from save to save, pinned on CUDA), so the folder holds exactly
the step being saved; DCP then plans and writes in its background thread: each rank writes its share of the
tensors (DDP replicas are written once, spread over the ranks) and rank 0 writes ``.metadata`` last.  The
files are fsynced (``FileSystemWriter(sync_files=True)``).

DCP writes into a folder it creates in place, so a kill mid-write would leave half a folder: it writes into a
staging folder instead, and when the whole save is done (rank 0's future completes after every rank has
written and the metadata is on disk) rank 0 swaps it in as ``last.dcp`` in one ``renameat2`` exchange and
keeps the folder it replaced as ``last.prev.dcp``, as for ``last.pt``.  ``best.dcp`` / ``epoch{N}.dcp`` are
hard-linked copies made *before* ``last.dcp`` is replaced.  At most one save is in flight.

The background writes use their own gloo process group: DCP's collectives then never interleave with DDP's
gradient all-reduces on the default group (torch's async-checkpointing guidance), and a CPU backend is what
``async_save`` requires.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ckpttools.atomic import fsync_dir, link_folder, publish_folder
from fuse_train.checkpoint.async_save import PinnedSnapshot
from fuse_train.process.distributed import DistInfo, all_gather_objects

SUFFIX = ".dcp"


class SnapshotStager:
    """DCP's staging step (its ``AsyncStager`` protocol) done by our ``PinnedSnapshot``: one batched copy into
    buffers reused from save to save.  DCP's default stager deep-copies the tree tensor by tensor into fresh
    memory, which on a detector's ~1,900 small tensors stalls the training thread several times longer
    (bench/save_bench.py).  The buffers are reused only after the previous save is written (``submit`` waits)."""

    _synchronize_after_execute = False  # the copy is complete when stage() returns

    def __init__(self, snapshot: PinnedSnapshot):
        self.snapshot = snapshot

    @property
    def should_synchronize_after_execute(self) -> bool:
        return self._synchronize_after_execute

    def stage(self, state_dict: dict) -> dict:
        copy = self.snapshot.take(state_dict)
        if self.snapshot.pending_device_copies:
            import torch

            torch.cuda.current_stream().synchronize()  # the device-to-host copies land before DCP reads them
        return copy

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


class DcpSaver:
    def __init__(self, dist: DistInfo, snapshot: PinnedSnapshot, weights_dir: Path):
        import torch.distributed as torch_dist

        self.dist = dist
        self.group = torch_dist.new_group(backend="gloo") if dist.enabled else None  # collective: every rank
        if not dist.enabled:
            # DCP says so at every save, from its writer thread (where a catch_warnings block cannot reach): a
            # one-process run saving DCP folders is intended here
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        self.stager = SnapshotStager(snapshot)
        owner = all_gather_objects(os.getpid(), dist)[0]  # the same staging name on every rank: rank 0's pid
        # ckpttools' temporary naming, so a run that starts after a kill removes what the dead one left
        self.staged = weights_dir / f".last{SUFFIX}.staged-{owner}.tmp"
        self._future: Future | None = None
        self._published: threading.Event | None = None
        self._error: BaseException | None = None

    def submit(
        self, state: dict[str, Any], last: Path, copies: list[Path], published: Callable[[], None] = lambda: None
    ) -> None:
        """Stage ``state`` now and write it in the background; rank 0 publishes it as ``last`` (and ``copies``),
        then calls ``published``."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        if self.dist.is_main:
            # a failed save's leftovers; no rank writes before rank 0 joins the planning collective
            shutil.rmtree(self.staged, ignore_errors=True)
        writer = dcp.FileSystemWriter(str(self.staged), sync_files=True)
        future = dcp.async_save(
            state,
            storage_writer=writer,
            process_group=self.group,
            async_stager=self.stager,
            no_dist=not self.dist.enabled,
        )
        self._future = future
        if self.dist.is_main:
            then, published = published, threading.Event()
            self._published = published
            # Future.result() returns before done-callbacks have run: wait() waits for this event instead
            future.add_done_callback(lambda f: self._publish(f, last, copies, published, then))

    def _publish(
        self, future: Future, last: Path, copies: list[Path], published: threading.Event, then: Callable[[], None]
    ) -> None:
        try:
            if future.exception() is not None:
                return  # wait() raises it from the future itself; nothing is published
            fsync_dir(self.staged)
            for path in copies:  # in place before last.dcp says the epoch is done
                link_folder(self.staged, path)
            publish_folder(self.staged, last)
            then()
        except BaseException as exc:  # noqa: BLE001 - raised on the training thread by the next wait()
            self._error = exc
        finally:
            published.set()

    @property
    def busy(self) -> bool:
        """A save is being written (on rank 0: or published)."""
        if self._future is None:
            return False
        return not self._future.done() or (self._published is not None and not self._published.is_set())

    def wait(self) -> None:
        """Until the save in flight is written and published; raises what it raised."""
        from torch.distributed.checkpoint.api import CheckpointException

        future, self._future = self._future, None
        if future is not None:
            try:
                future.result()
            except CheckpointException as exc:  # a BaseException: the trainer's error handling would miss it
                errors = getattr(exc, "failures", {}) or {}
                first = next(iter(errors.values()), exc)
                cause = getattr(first, "exc", first)  # DCP wraps each rank's exception with its traceback
                raise OSError(f"{self.staged}: DCP save failed: {cause}") from exc
            finally:
                if self._published is not None:
                    self._published.wait()
                    self._published = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
