"""What a run is made of, built from its options: the datasets, the model and its EMA, the optimizer, mixed
precision, the loss, and the record of what the options resolved to.  ``Trainer`` holds the result and adds
the run's position and the loop.  What a resume's options would resolve to, without building a run, is
``resume.requested_resolution`` (the same dataset survey and ``resolve_run``, the model on the meta device).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ckpttools.datasets.spec import load_data_spec
from ckpttools.datasets.survey import spec_fingerprint
from ckpttools.report import counted
from fuse_train.config import ConfigError, ResolvedRun, RunConfig, pick_img_size, resolve_run
from fuse_train.data.demo import resolve_data_yaml
from fuse_train.data.pairs import Augment, PairedDataset
from fuse_train.detector.loss import DetectionLoss
from fuse_train.detector.model import ModelConfig, anchor_grid, build_model, model_fingerprint
from fuse_train.process.distributed import DistInfo
from fuse_train.process.signals import worker_init
from fuse_train.training import state as S


@dataclass
class RunParts:
    train_set: PairedDataset
    val_set: PairedDataset
    model_config: ModelConfig
    model: nn.Module
    resolved: ResolvedRun
    ema: S.ModelEMA
    optimizer: torch.optim.Optimizer
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    criterion: DetectionLoss
    anchors: torch.Tensor
    strides: torch.Tensor


def build_run(cfg: RunConfig, dist_info: DistInfo, device: torch.device) -> RunParts:
    """Every part of the run, on ``device``, seeded by ``cfg.seed`` (the same parts on every rank)."""
    use_cuda = device.type == "cuda"
    spec = load_data_spec(resolve_data_yaml(cfg.data))
    img_size = pick_img_size(cfg, spec)
    if cfg.batch % dist_info.world_size:
        raise ConfigError(f"--batch {cfg.batch} must be divisible by the number of processes ({dist_info.world_size})")
    train_set = PairedDataset.from_spec(spec, "train", img_size, Augment(), cfg.seed)
    if len(train_set) < 2 * dist_info.world_size:  # batch norm needs two values per channel in a batch
        raise ConfigError(
            f"{spec.train or spec.root}: {counted(len(train_set), 'training image')}; training needs at least 2 per "
            f"process ({counted(dist_info.world_size, 'process', 'processes')})"
        )
    val_set = PairedDataset.from_spec(spec, "val", img_size)

    S.seed_everything(cfg.seed)
    model_config = ModelConfig(cfg.fusion, cfg.scale, len(spec.names))
    model = build_model(model_config, img_size).to(device)
    resolved = resolve_run(
        cfg, spec, img_size, dist_info.world_size, model_fingerprint(model), spec_fingerprint(spec), str(device)
    )
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    ema, optimizer = S.ModelEMA(model), build_optimizer(model, cfg)
    # bf16 where the GPU has it; FUSE_TRAIN_FORCE_FP16=1 (bench/cuda_check.py) exercises the fp16 + GradScaler path
    bf16 = torch.cuda.is_bf16_supported() if use_cuda else False
    amp_dtype = (
        (torch.bfloat16 if bf16 and not os.environ.get("FUSE_TRAIN_FORCE_FP16") else torch.float16)
        if use_cuda and cfg.amp
        else None
    )
    if os.environ.get("FUSE_TRAIN_DETERMINISTIC"):  # bench/cuda_check.py: deterministic kernels on CUDA too
        torch.use_deterministic_algorithms(True)
    anchors, strides = anchor_grid(img_size, device)
    return RunParts(
        train_set,
        val_set,
        model_config,
        model,
        resolved,
        ema,
        optimizer,
        amp_dtype,
        torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        DetectionLoss(model_config.nc, img_size).to(device),
        anchors,
        strides,
    )


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


def seed_worker(worker_id: int) -> None:
    """A DataLoader worker's start: signals left to the main process, the global generators seeded."""
    worker_init()  # the main process decides what a signal does (fuse_train/process/signals.py)
    # Augmentation draws from per-sample generators; seeding the global ones too keeps any library that
    # uses them reproducible.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
