"""ckpttools: read, check and change PyTorch checkpoints without running their code.

The Python API mirrors the commands: ``ckpttools.verify(path) -> Report``,
``ckpttools.inspect(path) -> dict``, ``ckpttools.preflight(recorded, requested, allow) -> PreflightReport``.
"""

__version__ = "0.1.0"

# Bound here, after the submodules load, so ``ckpttools.verify`` is the function, not the module.
from ckpttools.inspect_ckpt import inspect_checkpoint as inspect  # noqa: E402
from ckpttools.preflight import preflight  # noqa: E402
from ckpttools.verify import verify  # noqa: E402

__all__ = ["__version__", "verify", "inspect", "preflight"]
