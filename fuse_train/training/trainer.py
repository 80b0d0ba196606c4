"""The training loop: data, model, optimizer, AMP, EMA, evaluation, interrupts.

Everything that decides the next step lives in ``Trainer`` attributes that are saved by
``checkpoint_dict()`` and restored by ``load_checkpoint()`` (``checkpointing.CheckpointingMixin``), which is
what makes ``--resume`` exact.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from ckpttools.atomic import atomic_write, remove_stale
from ckpttools.report import counted
from fuse_train.checkpoint.async_save import AsyncSaver, PinnedSnapshot
from fuse_train.checkpoint.dcp_save import DcpSaver
from fuse_train.config import RunConfig
from fuse_train.data.pairs import collate
from fuse_train.failures import TrainingFailed, TrainingInterrupted  # noqa: F401 - raised here, caught by the CLI
from fuse_train.process.devices import select_device
from fuse_train.process.distributed import DistInfo, all_gather_objects, all_sum, any_rank, any_rank_flags
from fuse_train.process.signals import SignalState, loader_batches
from fuse_train.training import state as S
from fuse_train.training.build import build_run, seed_worker
from fuse_train.training.evaluation import EvaluationMixin
from fuse_train.training.progress import EpochProgress
from fuse_train.training.runlog import RunLog, boundaries, plot_results
from fuse_train.training.saving import CheckpointingMixin
from fuse_train.training.step_hooks import StepHooks


class Trainer(CheckpointingMixin, EvaluationMixin):
    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        dist_info: DistInfo | None = None,
        resume: dict | None = None,
        console=None,
        history_event: dict | None = None,
        stop_grace: float = 30.0,
        log_interval: float = 30.0,
    ):
        dist_info = dist_info or DistInfo()
        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist_info
        self.console = console
        self.device = select_device(cfg.device, dist_info.local_rank)
        self.use_cuda = self.device.type == "cuda"

        parts = build_run(cfg, dist_info, self.device)
        self.train_set, self.val_set = parts.train_set, parts.val_set
        self.model_config, self.model, self.resolved = parts.model_config, parts.model, parts.resolved
        self.ema = parts.ema
        self.optimizer, self.amp_dtype, self.scaler = parts.optimizer, parts.amp_dtype, parts.scaler
        self.criterion, self.anchors, self.strides = parts.criterion, parts.anchors, parts.strides

        self.sampler = S.EpochBatchSampler(
            len(self.train_set), cfg.batch, cfg.seed, dist_info.rank, dist_info.world_size
        )
        self.resolved.steps_per_epoch = self.sampler.steps_per_epoch
        self.schedule = self._make_schedule()
        self.train_model = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.use_cuda else None)
            if dist_info.enabled
            else self.model
        )

        # counters: the run's position
        self.epoch = 0  # epoch in progress (0-based)
        self.step_in_epoch = 0  # optimizer steps done in that epoch
        self.global_step = 0
        # where the current steps-per-epoch began (S.run_position): moved only by an allowed change of the batch
        # size or the data, so global_step == segment.global_step + (epoch - segment.epoch) * spe + step_in_epoch
        self.segment = S.Segment()
        self.epoch_loss_sum = torch.zeros(2, dtype=torch.float64)
        self.best_fitness: float | None = None
        self.last_metrics: dict = {}
        self.results: list[dict] = []
        self.history: list[dict] = []
        self.finished = False
        self.resumed = resume is not None
        self.resumed_log: dict | None = None
        self.runlog: RunLog | None = None  # opened by train(): nothing is written before then
        if resume is not None:
            self.load_checkpoint(resume)
        # reused buffers (pinned on CUDA); for .pt saves laid out as the file is, which is written from them
        self.snapshot = PinnedSnapshot(file_image=cfg.save_format == "pt")
        self.saver = (
            AsyncSaver(self.snapshot) if cfg.async_save and dist_info.is_main and cfg.save_format == "pt" else None
        )
        self.dcp_saver = DcpSaver(dist_info, self.snapshot, self.weights_dir) if cfg.save_format == "dcp" else None
        self._last_eval: tuple[list, list] = ([], [])
        self.history.append(history_event or {"event": "start", "date": S.now_iso(), "step": self.global_step})
        self.signals = SignalState(self.log, self.last_path.name)
        self.stop_grace, self.log_interval = stop_grace, log_interval
        self._save_seconds: float | None = None  # the latest .pt write, measured by the writer
        self._grace_checked = False
        self._requested_save_step: int | None = None  # SIGUSR1 on an epoch's last step (_train_epoch)
        self.hooks = StepHooks.from_env()  # tests and benches stop a run at an exact step

    @property
    def _stop_signal(self) -> int | None:
        return self.signals.stop

    # ---- state -------------------------------------------------------------------------------------------
    def _make_schedule(self) -> S.LRSchedule:
        spe = self.sampler.steps_per_epoch
        return S.LRSchedule(
            self.cfg.lr0,
            self.cfg.lrf,
            self.cfg.momentum,
            round(self.cfg.warmup_epochs * spe),
            self.cfg.epochs * spe,
            self.cfg.schedule,
        )

    def write_run_files(self) -> None:
        if not self.dist.is_main:
            return
        # temporaries of saves cut short by kill -9 are garbage (the target was never replaced)
        for folder in (self.weights_dir, self.run_dir):
            stale = remove_stale(folder)
            if stale:
                self.log(f"removed {counted(len(stale), 'temporary file')} left in {folder} by a run that was killed")
        with atomic_write(self.run_dir / "args.yaml", "w") as f:
            yaml.safe_dump({**self.cfg.to_dict(), "resolved": self.resolved.to_dict()}, f, sort_keys=False)
        self.runlog.write_results(self.results)  # cut back to the checkpoint's rows: none duplicated after a resume
        # a kill between a save's publication and its plot left an older one
        if self.resumed and self.results and self.cfg.plots:
            plot_results(
                self.results, boundaries(self.history, self.sampler.steps_per_epoch), self.run_dir / "results.png"
            )

    # ---- loop --------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.dist.is_main:
            (self.console.print(message, markup=False, highlight=False) if self.console else print(message, flush=True))

    def make_loader(self, dataset, batch_sampler):
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=self.cfg.workers,
            collate_fn=collate,
            pin_memory=self.use_cuda,
            worker_init_fn=seed_worker,
            persistent_workers=False,
        )

    def train(self, on_start: Callable[[], None] | None = None) -> dict:
        """Train to the last epoch; ``on_start`` runs once the signal handlers are in place (the line saying the run
        has started is then a promise that a stop signal is handled)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        restore_signals = self.signals.install()
        if on_start is not None:
            on_start()
        try:
            # purge_step = the checkpoint's step + 1: events written after it by a killed run are dropped (for a
            # fresh run, step 1: whatever an earlier attempt that never saved left in the folder)
            self.runlog = RunLog(
                self.run_dir,
                self.global_step,
                self.cfg.to_dict(),
                enabled=self.dist.is_main,
                fresh=not self.resumed,
                replay=self.resumed_log,
            )
            self.write_run_files()
            while self.epoch < self.cfg.epochs:
                self._train_epoch()
                last = self._end_epoch()  # saves last.pt; the final one is marked finished
                if any_rank(self._stop_signal is not None, self.dist, self.device) and self.epoch < self.cfg.epochs:
                    raise TrainingInterrupted(
                        self._stop_signal or signal.SIGTERM, last
                    )  # signal came during evaluation
            if self.dist.is_main and self.cfg.plots:
                self.final_plots()
        finally:
            self._wait_for_saves()  # a save in flight is finished (or its error raised) before the run ends
            if self.runlog is not None:
                self.runlog.close()
            if self._stop_signal is None:  # once stopping, keep the handler: a second Ctrl-C must exit quietly
                restore_signals()
        return self.last_metrics

    def _train_epoch(self) -> None:
        cfg, spe = self.cfg, self.sampler.steps_per_epoch
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        batches = loader_batches(self.make_loader(self.train_set, self.sampler))  # workers ignore signals
        self.train_model.train()
        progress = EpochProgress(self, spe)
        t0 = time.time()
        self._epoch_started = time.time()
        for images, targets, _ in batches:
            # the schedule runs on the epoch position (S.schedule_step), so a resume with another batch size
            # continues its curve: no second warmup, lr0 * lrf at the last step
            lr = self.schedule.apply(self.optimizer, S.schedule_step(self.epoch, self.step_in_epoch, spe))
            loss_parts = self._step(images, targets)
            self.epoch_loss_sum += loss_parts.to(torch.float64).cpu()
            self.step_in_epoch += 1
            self.global_step += 1
            self.runlog.step(self.global_step, loss_parts.tolist(), [g["lr"] for g in self.optimizer.param_groups])
            progress.update(self.epoch_loss_sum / self.step_in_epoch, lr, time.time() - t0)
            self.hooks.after_step(self.global_step, self.signals)
            stop, save_now = any_rank_flags(
                [self._stop_signal is not None, self.signals.save_requested], self.dist, self.device
            )
            if stop and self.step_in_epoch < spe:
                progress.close()
                path = self.save(wait=True)  # the resumable save: whole before the process exits
                raise TrainingInterrupted(self._stop_signal or signal.SIGTERM, path)
            # a stop on the epoch's last step lets evaluation and the epoch-end save run first (see train())
            periodic = cfg.save_every and self.global_step % cfg.save_every == 0
            if (periodic or save_now) and self.step_in_epoch < spe:
                self.signals.save_requested = False
                step = self.global_step
                self.save(
                    published=(lambda step=step: self.log(f"saved {self.last_path.name} at step {step} (SIGUSR1)"))
                    if save_now
                    else None
                )
            elif save_now:  # the epoch-end save is the requested one, and says so once it is written
                self.signals.save_requested = False
                self._requested_save_step = self.global_step
        progress.close()

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float().div_(255)
        if self.use_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(self.device)
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with autocast:
            outputs = self.train_model(images)
        loss, parts = self.criterion(outputs, targets)
        if any_rank(not bool(torch.isfinite(loss.detach())), self.dist, self.device):
            # stop before the step: the weights (and every saved checkpoint) stay finite
            raise TrainingFailed(
                f"the loss became non-finite at step {self.global_step + 1} (epoch {self.epoch + 1}); "
                f"nothing was saved from it ({self.last_path} is the last good state): "
                "lower --lr0, keep --grad-clip on, or check the labels"
            )
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        return parts

    def _end_epoch(self) -> Path:
        losses = all_sum(self.epoch_loss_sum, self.dist) / (self.step_in_epoch * self.dist.world_size)
        metrics = self.evaluate() if self.dist.is_main else None
        metrics = all_gather_objects(metrics, self.dist)[0]
        improved = self.best_fitness is None or metrics.fitness > self.best_fitness
        if improved:
            self.best_fitness = metrics.fitness
        row = self.epoch_row(losses, metrics)
        self.results.append(row)
        self.last_metrics = metrics.as_dict()
        seconds = time.time() - self._epoch_started
        epoch_scalars = self.runlog.epoch_scalars(row, seconds)
        self.runlog.note(self.global_step, epoch_scalars)  # in the checkpoint's record; written once it is published
        self.log_epoch(row, metrics, improved)
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum = torch.zeros(2, dtype=torch.float64)
        period = self.cfg.save_period > 0 and self.epoch % self.cfg.save_period == 0
        if self.epoch >= self.cfg.epochs:
            self.finished = True
        log_epoch = self._epoch_logger(self.global_step, epoch_scalars)
        requested, self._requested_save_step = self._requested_save_step, None

        def published() -> None:
            log_epoch()
            if requested is not None:  # SIGUSR1 on the epoch's last step: this is the save it asked for
                self.log(f"saved {self.last_path.name} at step {requested} (SIGUSR1)")

        path = self.save(
            best=improved,
            period=period,
            wait=self.finished or self._stop_signal is not None,
            published=published,
        )
        self._check_stop_fits_grace(seconds / max(1, self.sampler.steps_per_epoch))
        return path
