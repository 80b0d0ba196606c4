"""ckpttools: read, check and change PyTorch checkpoints without running their code.

The Python API mirrors the commands: ``ckpttools.verify(path) -> Report``, ``ckpttools.inspect(path) -> dict``,
``ckpttools.preflight(recorded, requested, allow) -> PreflightReport``.  They are imported on first use, so
``import ckpttools`` (and ``ckpt --help``) costs nothing beyond this file.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["__version__", "verify", "inspect", "preflight"]

_LAZY = {
    "verify": ("ckpttools.commands.verify", "verify"),
    "inspect": ("ckpttools.commands.inspect", "inspect_checkpoint"),
    "preflight": ("ckpttools.commands.preflight", "preflight"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ckpttools' has no attribute {name!r}")
