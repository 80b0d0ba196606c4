"""The trainer's checkpoints, written: what a checkpoint holds (``checkpoint_dict``, everything that decides the
next step), how it is restored (``load_checkpoint``), and the saving policy (snapshot now, write in the
background or at once, the copies in place before ``last.pt``, the previous ``last.pt`` kept, a full disk named).
A mixin of ``Trainer``: the state it reads and writes is the trainer's.  Reading files is ``reading.py``."""

from __future__ import annotations

import errno
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ckpttools.atomic import atomic_path, copy_into_place, keep_previous, temp_path
from ckpttools.digest import DIGEST_KEY, digest_record
from ckpttools.formats import live_torch, zipimage
from fuse_train import __version__
from fuse_train.failures import TrainingFailed
from fuse_train.process.distributed import all_gather_objects, barrier, rank0_copies
from fuse_train.training import state as S
from fuse_train.training.runlog import boundaries, plot_results


class CheckpointingMixin:
    def checkpoint_dict(self) -> dict:
        """Everything that decides the next step, as references to the live tensors (``save`` copies them)."""
        rng = all_gather_objects(S.capture_rng(), self.dist)
        loss_sums = torch.stack(all_gather_objects(self.epoch_loss_sum.clone(), self.dist))  # [world_size, 2]
        ckpt = {
            S.K_FORMAT: S.FORMAT_NAME,
            S.K_VERSION: S.FORMAT_VERSION,
            S.K_EPOCH: self.epoch - 1,  # last completed epoch, 0-based (-1: none yet), as Ultralytics
            S.K_BEST_FITNESS: self.best_fitness,
            S.K_MODEL: {
                k: v.detach().float() if v.dtype.is_floating_point else v.detach()
                for k, v in self.model.state_dict().items()
            },
            S.K_EMA: {k: v.detach() for k, v in self.ema.ema.state_dict().items()},
            S.K_UPDATES: self.ema.updates,
            S.K_OPTIMIZER: self.optimizer.state_dict(),
            S.K_SCHEDULER: self.schedule.state_dict(),
            S.K_SCALER: self.scaler.state_dict(),
            S.K_TRAIN_ARGS: self.cfg.to_dict(),
            S.K_RESOLVED: self.resolved.to_dict(),
            S.K_MODEL_CONFIG: self.model_config.to_dict(),
            S.K_METRICS: dict(self.last_metrics),
            S.K_RESULTS: [dict(r) for r in self.results],
            S.K_PROGRESS: {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "steps_per_epoch": self.sampler.steps_per_epoch,
                "epoch_loss_sum": loss_sums,
                "samples_seen": self.segment.samples_seen
                + (self.global_step - self.segment.global_step) * self.cfg.batch,
                "segment": self.segment.to_dict(),
                "finished": self.finished,
                # the TensorBoard scalars of this step: a resume writes them again (RunLog.replay)
                "logged": self._logged_record(),
            },
            S.K_RNG: {"world_size": self.dist.world_size, "ranks": rng},
            S.K_HISTORY: [dict(h) for h in self.history],
            S.K_VERSIONS: {
                "fuse_train": __version__,
                "torch": str(torch.__version__),
                "python": sys.version.split()[0],
            },
            S.K_DATE: S.now_iso(),
        }
        if self.dcp_saver is not None and self.dist.enabled:
            # DCP writes a key every rank holds once, from whichever rank its planner picks, so every rank must hold
            # rank 0's values.  Parameters and optimizer state are equal on all ranks; batch-norm running
            # statistics (and the EMA's copies of them) are each rank's own until DDP broadcasts rank 0's at the
            # next forward.  The live buffers stay as they are: training is the same with either format.
            for key, module in ((S.K_MODEL, self.model), (S.K_EMA, self.ema.ema)):
                buffers = {name: ckpt[key][name] for name, _ in module.named_buffers() if name in ckpt[key]}
                ckpt[key].update(rank0_copies(buffers, self.dist))
        return ckpt  # live references: save() snapshots them before anything can change them

    def _logged_record(self) -> dict | None:
        """Rank 0's record of what TensorBoard got at this step (every rank holds it: DCP writes it from any)."""
        record = self.runlog.record() if self.runlog is not None else None
        return all_gather_objects(record, self.dist)[0] if self.dist.enabled else record

    def load_checkpoint(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt[S.K_MODEL])
        self.ema.ema.load_state_dict(ckpt[S.K_EMA])
        self.ema.updates = int(ckpt[S.K_UPDATES])
        self.optimizer.load_state_dict(ckpt[S.K_OPTIMIZER])
        if ckpt.get(S.K_SCALER):
            self.scaler.load_state_dict(ckpt[S.K_SCALER])
        p = ckpt[S.K_PROGRESS]
        self.epoch, self.step_in_epoch, self.global_step = (
            int(p["epoch"]),
            int(p["step_in_epoch"]),
            int(p["global_step"]),
        )
        self.epoch_loss_sum = S.rank_loss_sum(p["epoch_loss_sum"], self.dist.rank, self.dist.world_size)
        self.segment = S.Segment.from_progress(p)
        spe, saved_spe = self.sampler.steps_per_epoch, int(p["steps_per_epoch"])
        if spe != saved_spe:  # an allowed change of the batch size or of the data: a new segment starts here
            saved_batch = int(ckpt[S.K_TRAIN_ARGS]["batch"])
            step, self.segment = S.continue_with(p, saved_batch, self.cfg.batch, spe)
            if self.step_in_epoch:  # the epoch's mean loss stays the mean over its steps
                self.epoch_loss_sum *= step / self.step_in_epoch
            self.step_in_epoch = step
        self.finished = bool(p.get("finished", False))
        self.best_fitness = ckpt[S.K_BEST_FITNESS]
        self.last_metrics = dict(ckpt.get(S.K_METRICS) or {})
        self.results = [dict(r) for r in ckpt.get(S.K_RESULTS, [])]
        self.history = [dict(h) for h in ckpt.get(S.K_HISTORY, [])]
        self.resumed_log = p.get("logged")
        ranks = ckpt[S.K_RNG]["ranks"]
        if len(ranks) == self.dist.world_size:
            S.restore_rng(ranks[self.dist.rank])

    # ---- saving ------------------------------------------------------------------------------------------
    @property
    def weights_dir(self) -> Path:
        return self.run_dir / "weights"

    def save(
        self,
        *,
        best: bool = False,
        period: bool = False,
        wait: bool = False,
        published: Callable[[], None] | None = None,
    ) -> Path:
        """Save weights/last.pt (and best.pt / epoch{N}.pt; ``.dcp`` folders with --save-format dcp); every rank
        must call it.

        The state is snapshotted now (the step being saved); rank 0 writes it (with DCP, every rank writes its
        share), in the background unless ``--no-async-save`` or ``wait`` (an interrupt, the run's last save):
        then it returns once the checkpoint is whole.  ``published`` runs on rank 0 once the checkpoint is in
        place (on the writer's thread for a background save): what the logs may show only then."""
        state = self.checkpoint_dict()
        last = self.last_path
        copies = ([self.weights_dir / f"best{last.suffix}"] if best else []) + (
            [self.weights_dir / f"epoch{self.epoch}{last.suffix}"] if period else []
        )
        if self.dist.is_main:
            self.runlog.flush()
        then = (published or (lambda: None)) if self.dist.is_main else (lambda: None)
        if self.dcp_saver is not None:
            self.dcp_saver.submit(state, last, copies, then)
            if wait or not self.cfg.async_save:
                self._wait_for_saves()
        elif self.dist.is_main:
            if self.saver is not None and not wait:
                self.saver.submit(state, lambda snapshot: (self._write_checkpoint(snapshot, last, copies), then()))
            else:
                if self.saver is not None:
                    self._wait_for_saves()  # the save in flight first: files are replaced in step order
                self._write_checkpoint(self.snapshot.take(state), last, copies)
                then()
        if wait or not self.cfg.async_save:  # the same decision on every rank
            barrier(self.dist)
        return last

    @property
    def last_path(self) -> Path:
        return self.weights_dir / ("last.dcp" if self.cfg.save_format == "dcp" else "last.pt")

    def _wait_for_saves(self) -> None:
        """The save in flight is whole (or its error raised), whichever writer has it."""
        for saver in (self.saver, self.dcp_saver):
            if saver is not None:
                try:
                    saver.wait()
                except (OSError, RuntimeError) as exc:
                    raise self._save_failure(self.last_path, exc) from exc

    def _write_checkpoint(self, ckpt: dict, last: Path, copies: list[Path]) -> None:
        """Digest, then the crash-safe write: a staged file, the copies put in place *before* last.pt is
        replaced (once last.pt says an epoch is done, its copies exist), the previous last.pt kept."""
        started = time.perf_counter()
        staged = temp_path(last, "staged")
        try:
            staged.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(staged) as tmp:
                self._write_file(ckpt, tmp)
            for path in copies:
                copy_into_place(staged, path)
            keep_previous(last)  # last.prev.pt: the previous good checkpoint survives the replacement
            copy_into_place(staged, last)
            self._save_seconds = time.perf_counter() - started
        except (OSError, RuntimeError) as exc:
            raise self._save_failure(last, exc) from exc
        finally:
            staged.unlink(missing_ok=True)

    def _write_file(self, ckpt: dict, path: Path) -> None:
        """torch.save's file of ``ckpt`` (its digest recorded), the cheapest way the tree allows."""
        image = self.snapshot.image
        # the snapshot laid out as the file: one pass over its bytes, written from it (zipimage)
        if image is not None and zipimage.write(ckpt, *image, path):
            return
        ckpt[DIGEST_KEY] = digest_record(ckpt)
        with open(path, "wb") as f:  # streamed: no second in-memory copy of the checkpoint
            # our zip writer from the snapshot's memory (the GIL released for the bytes; each slot of the arena
            # a storage of its own); torch.save itself, on copies, for a tree that writer leaves to it
            if not live_torch.save(ckpt, f, zipimage.slots(*image[:2]) if image is not None else None):
                torch.save(_own_storages(ckpt), f)

    def _save_failure(self, last: Path, exc: BaseException) -> BaseException:
        """A full disk named as such (torch reports it as a RuntimeError from its zip writer); else ``exc``."""
        try:
            free = shutil.disk_usage(last.parent).free
        except OSError:  # the folder itself is gone: the error says what happened
            return exc
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or free < (64 << 20):
            return TrainingFailed(
                f"disk full writing {last} ({free / 2**20:.0f} MiB free): the previous {last.name} "
                "is kept; free some space and resume with: fuse-train --resume " + str(last)
            )
        return exc

    def _check_stop_fits_grace(self, step_seconds: float) -> None:
        """Once, after the first save was written: can a stop finish inside the scheduler's grace period?

        A stop finishes the step, waits for a save in flight and writes the resumable checkpoint, so it needs
        about one step and two saves.  If that is more than --stop-grace (torchrun and Kubernetes give 30 s
        before SIGKILL), say so in one line, while there is time to change the set-up."""
        if self._grace_checked or not self.dist.is_main or self._save_seconds is None:
            return
        self._grace_checked = True
        needed = step_seconds + 2 * self._save_seconds
        if needed > self.stop_grace:
            self.log(
                f"warning: a stop (SIGTERM) needs about {needed:.0f} s here (a step {step_seconds:.1f} s, writing "
                f"{self.last_path.name} {self._save_seconds:.1f} s, twice if a save is in flight), more than the "
                f"{self.stop_grace:.0f} s grace before SIGKILL (--stop-grace): raise the scheduler's grace "
                "(Kubernetes terminationGracePeriodSeconds, Slurm KillWait), or send SIGUSR1 before the end "
                "(Slurm --signal=USR1@90) so the last save is recent"
            )

    def _epoch_logger(self, step: int, scalars: list) -> Callable[[], None]:
        """What shows an epoch as done (its TensorBoard scalars, results.csv, results.png), written only once the
        checkpoint that holds the epoch is published: the logs never claim more than the checkpoint has.  The
        rows are copied now; the writer thread runs this later while training goes on."""
        rows = [dict(r) for r in self.results]
        marks = boundaries(self.history, self.sampler.steps_per_epoch)

        def write() -> None:
            self.runlog.write_scalars(step, scalars)
            self.runlog.write_results(rows)
            if self.dist.is_main and self.cfg.plots:
                plot_results(rows, marks, self.run_dir / "results.png")

        return write


def _own_storages(tree):
    """The tree with each tensor copied into a storage of its own (torch.save writes a view's whole storage, and
    refuses one storage viewed as several dtypes: the snapshot's arena is both)."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return type(tree)((k, _own_storages(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(_own_storages(v) for v in tree)
    return tree
