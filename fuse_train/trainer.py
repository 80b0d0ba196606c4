"""The training loop: data, model, optimizer, AMP, EMA, evaluation, interrupts.

Everything that decides the next step lives in ``Trainer`` attributes that are saved by
``checkpoint_dict()`` and restored by ``load_checkpoint()`` (``checkpointing.CheckpointingMixin``), which is
what makes ``--resume`` exact.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel

from ckpttools.atomic import atomic_write, remove_stale
from fuse_train import state as S
from fuse_train.async_save import AsyncSaver, PinnedSnapshot
from fuse_train.checkpointing import CheckpointingMixin
from fuse_train.config import ConfigError, RunConfig, pick_img_size, resolve_run
from fuse_train.data import Augment, PairedDataset, collate, load_data_spec, spec_fingerprint
from fuse_train.dcp_save import DcpSaver
from fuse_train.demo import ensure_demo
from fuse_train.devices import select_device
from fuse_train.distributed import (
    DistInfo,
    all_gather_objects,
    all_sum,
    any_rank,
    any_rank_flags,
)
from fuse_train.failures import TrainingFailed, TrainingInterrupted  # noqa: F401 - raised here, caught by the CLI
from fuse_train.loss import DetectionLoss
from fuse_train.metrics import DetectionMetrics, confusion_matrix, detect_dataset, evaluate_detections
from fuse_train.model import ModelConfig, anchor_grid, build_model, model_fingerprint
from fuse_train.progress import EpochProgress
from fuse_train.runlog import RunLog, boundaries, plot_confusion, plot_curves, plot_labels, plot_results
from fuse_train.signals import SignalState, loader_batches, worker_init


def resolve_data_yaml(data: str) -> Path:
    return ensure_demo() if data == "demo" else Path(data).expanduser().resolve()


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """Weight decay on conv / linear weights only, not on BatchNorm weights or biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            (decay if name == "weight" and not is_norm else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "SGD":
        return torch.optim.SGD(groups, lr=cfg.lr0, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr0, betas=(cfg.momentum, 0.999))


def _seed_worker(worker_id: int) -> None:
    worker_init()  # the main process decides what a signal does (fuse_train/signals.py)
    # Augmentation draws from per-sample generators; seeding the global ones too keeps any library that
    # uses them reproducible.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


class Trainer(CheckpointingMixin):
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

        spec = load_data_spec(resolve_data_yaml(cfg.data))
        img_size = pick_img_size(cfg, spec)
        nc = len(spec.names)
        if cfg.batch % dist_info.world_size:
            raise ConfigError(
                f"--batch {cfg.batch} must be divisible by the number of processes ({dist_info.world_size})"
            )
        self.train_set = PairedDataset.from_spec(spec, "train", img_size, Augment(), cfg.seed)
        if len(self.train_set) < 2 * dist_info.world_size:  # batch norm needs two values per channel in a batch
            raise ConfigError(
                f"{spec.train or spec.root}: {len(self.train_set)} training image(s); training needs at least 2 per "
                f"process ({dist_info.world_size} process(es))"
            )
        self.val_set = PairedDataset.from_spec(spec, "val", img_size)

        S.seed_everything(cfg.seed)
        self.model_config = ModelConfig(cfg.fusion, cfg.scale, nc)
        self.model = build_model(self.model_config, img_size).to(self.device)
        self.resolved = resolve_run(
            cfg,
            spec,
            img_size,
            dist_info.world_size,
            model_fingerprint(self.model),
            spec_fingerprint(spec),
            str(self.device),
        )
        if self.use_cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = S.ModelEMA(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        # bf16 where the GPU has it; FUSE_TRAIN_FORCE_FP16=1 (bench/cuda_check.py) exercises the fp16 + GradScaler path
        bf16 = torch.cuda.is_bf16_supported() if self.use_cuda else False
        self.amp_dtype = (
            (torch.bfloat16 if bf16 and not os.environ.get("FUSE_TRAIN_FORCE_FP16") else torch.float16)
            if self.use_cuda and cfg.amp
            else None
        )
        if os.environ.get("FUSE_TRAIN_DETERMINISTIC"):  # bench/cuda_check.py: deterministic kernels on CUDA too
            torch.use_deterministic_algorithms(True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.criterion = DetectionLoss(nc, img_size).to(self.device)
        self.anchors, self.strides = anchor_grid(img_size, self.device)

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
        self.snapshot = PinnedSnapshot()  # reused pinned buffers on CUDA
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
        # Test hook: behave as if Ctrl-C arrived during optimizer step N (so tests can stop at an exact step).
        stop_at = os.environ.get("FUSE_TRAIN_STOP_AFTER_STEP")
        self._stop_after_step = int(stop_at) if stop_at else None
        # Test hook: a real signal to this process after step N ("TERM:N", "KILL:N"): SIGTERM goes through the
        # handler like an outside one, SIGKILL dies wherever the run is (events written, not yet saved, ...).
        signal_at = os.environ.get("FUSE_TRAIN_SIGNAL_AFTER_STEP", "")
        self._signal_after = (
            (getattr(signal, "SIG" + signal_at.split(":")[0]), int(signal_at.split(":")[1])) if signal_at else None
        )

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
                self.log(f"removed {len(stale)} temporary file(s) left in {folder} by a run that was killed")
        with atomic_write(self.run_dir / "args.yaml", "w") as f:
            yaml.safe_dump({**self.cfg.to_dict(), "resolved": self.resolved.to_dict()}, f, sort_keys=False)
        self.runlog.write_results(self.results)  # cut back to the checkpoint's rows: none duplicated after a resume
        if self.resumed and self.results:  # a kill between a save's publication and its plot left an older one
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
            worker_init_fn=_seed_worker,
            persistent_workers=False,
        )

    def train(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
        restore_signals = self.signals.install()
        try:
            while self.epoch < self.cfg.epochs:
                self._train_epoch()
                last = self._end_epoch()  # saves last.pt; the final one is marked finished
                if any_rank(self._stop_signal is not None, self.dist, self.device) and self.epoch < self.cfg.epochs:
                    raise TrainingInterrupted(
                        self._stop_signal or signal.SIGTERM, last
                    )  # signal came during evaluation
            if self.dist.is_main:
                self._final_plots()
        finally:
            self._wait_for_saves()  # a save in flight is finished (or its error raised) before the run ends
            self.runlog.close()
            if self._stop_signal is None:  # once stopping, keep the handler: a second Ctrl-C must exit quietly
                restore_signals()
        return self.last_metrics

    def _final_plots(self) -> None:
        """The end-of-training figures, from the last evaluation (EMA weights) and the training labels."""
        names = self.resolved.names
        preds, gts = self._last_eval
        metrics = evaluate_detections(preds, gts, self.model_config.nc)
        plot_curves(metrics.curves, names, self.run_dir)
        plot_confusion(confusion_matrix(preds, gts, self.model_config.nc), names, self.run_dir / "confusion_matrix.png")
        plot_labels(self.train_set.labels, names, self.run_dir / "labels.png")

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
            if self._stop_after_step == self.global_step:
                self.signals.stop = signal.SIGINT
            if self._signal_after and self._signal_after[1] == self.global_step:
                os.kill(os.getpid(), self._signal_after[0])
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
        fitness = metrics.fitness
        improved = self.best_fitness is None or fitness > self.best_fitness
        if improved:
            self.best_fitness = fitness
        lr = self.optimizer.param_groups[0]["lr"]
        row = {
            "epoch": self.epoch + 1,
            "train/box_loss": float(losses[0]),
            "train/cls_loss": float(losses[1]),
            "metrics/precision": metrics.precision,
            "metrics/recall": metrics.recall,
            "metrics/mAP50": metrics.map50,
            "metrics/mAP50-95": metrics.map,
            "fitness": fitness,
            "lr": lr,
        }
        self.results.append(row)
        self.last_metrics = metrics.as_dict()
        seconds = time.time() - self._epoch_started
        epoch_scalars = self.runlog.epoch_scalars(row, seconds)
        self.runlog.note(self.global_step, epoch_scalars)  # in the checkpoint's record; written once it is published
        self.log(
            f"epoch {self.epoch + 1}/{self.cfg.epochs}  box {row['train/box_loss']:.4f}  cls "
            f"{row['train/cls_loss']:.4f}"
            f"  P {metrics.precision:.3f}  R {metrics.recall:.3f}  mAP50 {metrics.map50:.3f}"
            f"  mAP50-95 {metrics.map:.3f}" + ("  (best)" if improved else "")
        )
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
            if self.dist.is_main:
                plot_results(rows, marks, self.run_dir / "results.png")

        return write

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> DetectionMetrics:
        model = model or self.ema.ema
        model.eval()
        preds, gts = detect_dataset(
            model,
            self.val_set,
            self.anchors,
            self.strides,
            self.device,
            self.cfg.conf,
            self.cfg.iou,
            max(2, 2 * self.resolved.per_rank_batch),
            self.cfg.workers,
            self.amp_dtype,
            channels_last=self.use_cuda,
            pin_memory=self.use_cuda,
        )
        self._last_eval = (preds, gts)
        return evaluate_detections(preds, gts, self.model_config.nc)
