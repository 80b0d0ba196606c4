"""One root error for everything ``ckpt`` refuses; each kind carries its exit code.

The CLI catches ``CkptError`` once and prints ``ckpt COMMAND: error: MESSAGE`` (one line; the message names
the path and what is wrong) and exits with ``exit_code``.  Anything else is a bug and is shown as an internal
error (traceback with ``--debug``).
"""

from __future__ import annotations

EXIT_OK = 0  # all good
EXIT_PROBLEMS = 1  # problems found, differences found, or an input that is damaged or unsafe
EXIT_USAGE = 2  # bad option, missing path, existing output, not a checkpoint this tool reads
EXIT_PREFLIGHT = 3  # the preflight blocked a resume
EXIT_BROKEN_PIPE = 141  # the reader of our output went away (128 + SIGPIPE, as a shell reports it)


class CkptError(Exception):
    """Root of every expected failure; ``str(exc)`` is the one-line message."""

    exit_code = EXIT_PROBLEMS


class UsageError(CkptError):
    """Something the user typed cannot be done: a bad option, an output that exists, a missing path."""

    exit_code = EXIT_USAGE


class MissingPath(UsageError):
    def __init__(self, path) -> None:
        super().__init__(f"{path}: no such file or folder")
        self.path = path


class NotACheckpoint(UsageError):
    """The path is not something this tool reads as a checkpoint; the message says what it is instead."""


class OtherArchive(NotACheckpoint):
    """An intact archive of another kind (a torch.export .pt2, a .keras file): declined (exit 2), never reported
    as a damaged checkpoint."""


class FormatLimit(UsageError):
    """The target format cannot hold part of the input exactly (a dtype or tensor kind it has no code for): the
    conversion is refused, naming what, rather than written with values changed or left out."""

    def __init__(self, message: str, paths: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.paths = list(paths)  # every tensor refused (the message names the first few)


class DamagedInput(CkptError):
    """The input is a checkpoint, but damaged: it cannot be used until repaired."""


class UnsafeInput(CkptError):
    """The input's pickle would run code that the safety policy does not allow."""
