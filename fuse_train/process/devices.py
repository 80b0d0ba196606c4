"""The one reading of ``--device`` for training, val, predict and export: '' (CUDA when present, else CPU), 'cpu',
an index ('0') or 'cuda:K'; offset by the local rank under torchrun.  A device this machine lacks is a one-line
ConfigError (exit 2), never a CUDA error from deep inside torch."""

from __future__ import annotations

import torch

from ckpttools.report import counted
from fuse_train.config import ConfigError


def select_device(spec: str, local_rank: int = 0) -> torch.device:
    spec = (spec or "").strip().lower()
    if spec == "":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    index = spec.removeprefix("cuda:").removeprefix("cuda")
    if not index.isdigit() and index != "":
        raise ConfigError(f"--device {spec!r}: expected cpu, an index like 0, or cuda:0")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
    idx = int(index or 0) + local_rank
    if idx >= torch.cuda.device_count():
        raise ConfigError(f"--device {spec}: only {counted(torch.cuda.device_count(), 'CUDA device')} present")
    return torch.device(f"cuda:{idx}")
