"""fuse-train's checkpoints as files: the one reader (integrity, fallback), the background writer of
``.pt`` saves and the DCP folder writer.  What a save holds and when it is taken is the trainer's
(``training/saving.py``)."""
