"""Container formats, each in its own module with its reader and (where it can be written) its writer.

``registry.open_checkpoint(path)`` is the one way into a checkpoint: it refuses what is not a regular file or folder,
asks each format in ``FORMATS`` whether it recognises the path, and opens it.  Every pickle met on the way is
scanned (``ckpttools.pickle``) before the restricted unpickler reads it.

To add a format: a module here with ``NAME``, ``detect(path, head) -> bool`` and ``read(path) -> Checkpoint``
(and a writer if it can be written), one line in ``registry.FORMATS``, and a round-trip test.
"""
