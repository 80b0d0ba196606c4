"""fuse-train: the reference dual-stream RGB+infrared object-detector trainer of ckpttools."""

from ckpttools import __version__

__all__ = ["__version__"]
