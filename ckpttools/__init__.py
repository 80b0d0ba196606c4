"""ckpttools: read, check and change PyTorch checkpoints without running their code."""

__version__ = "0.1.0"
