"""Crash-safe file writes.

A checkpoint is only ever replaced by a complete, fsynced file: the new bytes go to a temporary file in
the same folder (so ``os.replace`` is a rename on one filesystem, which POSIX makes atomic), the file is
flushed and fsynced, renamed over the target, and finally the folder itself is fsynced so the rename
survives a power cut.  ``kill -9`` at any moment leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

from ckpttools.errors import UsageError

PREVIOUS_SUFFIX = ".prev"  # weights/last.pt -> weights/last.prev.pt


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where the OS cannot open folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it atomically becomes ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    os.chmod(tmp, _default_mode(path))  # mkstemp makes 0600; a checkpoint should get the usual permissions
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, verify=None) -> Iterator[Path]:
    """Like ``atomic_write`` for writers that need a path (h5py, torch's DCP): yields a temporary path beside
    ``path`` that becomes ``path`` only if the body succeeds and ``verify(tmp)`` (if given) returns True."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if verify is not None and not verify(tmp):
            return
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _default_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def previous_path(path: str | os.PathLike) -> Path:
    """Where the previous good copy of ``path`` is kept: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(path.stem + PREVIOUS_SUFFIX + path.suffix)


def keep_previous(path: str | os.PathLike) -> Path | None:
    """Preserve the current ``path`` as ``previous_path(path)`` without ever leaving ``path`` missing.

    A hard link (falling back to a copy) is made under a temporary name and renamed into place, so at every
    moment both names hold complete files.  Returns the previous-copy path, or None if ``path`` did not exist.
    """
    path = Path(path)
    if not path.exists():
        return None
    prev = previous_path(path)
    if prev.exists() and os.path.samefile(path, prev):
        # a save cut short after this point last time: prev already is this file.  Linking again would make
        # rename(2) between two names of one inode a silent no-op and strand the temporary name.
        return prev
    tmp = prev.with_name(f".{prev.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copy2(path, tmp)
    os.replace(tmp, prev)
    tmp.unlink(missing_ok=True)  # still there only if rename(2) found both names on one inode (a race with us)
    fsync_dir(path.parent)
    return prev


# ---- outputs of the commands that write ----------------------------------------------------------------------

def check_new_output(out: Path, inputs: Iterable[Path], force: bool) -> None:
    """Outputs go to a new path: never an input, never an existing file unless --force."""
    for src in inputs:
        if src.exists() and out.exists() and out.resolve() == src.resolve():
            raise UsageError(f"{out}: is the input; write the result to a new path (inputs are never modified)")
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such folder for the output")


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces it only when the body finishes."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
