"""Crash-safe writes: nothing the user had is lost, whatever happens mid-write.

A file is only ever replaced by a complete, fsynced one: the new bytes go to a temporary file in the same
folder (so the final step is a rename on one filesystem, which POSIX makes atomic), the file is flushed and
fsynced, renamed over the target, and the folder itself is fsynced so the rename survives a power cut.
``kill -9`` at any moment leaves either the old file or the new one under the final name, never a mix.
Folders (DCP outputs) are built beside the target and swapped in with one ``renameat2(RENAME_EXCHANGE)``.

Temporaries have one naming scheme, ``.<name>.<tag>-<pid>.tmp``, so a writer can tell whose they are: every
writer removes the stale temporaries of dead processes in the folder it writes to (``remove_stale``).

``CKPTTOOLS_FAULT=<point>[@N][:THREAD]`` (tests only) kills the process with SIGKILL when a write reaches
``<point>`` (for the N-th time, on that thread):
``before-fsync``, ``before-rename``, ``after-rename``, ``keep-previous``, ``folder-before-swap``,
``folder-after-swap``; tests/faults/ drives every writer through every point.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from ckpttools.errors import CkptError, UsageError
from ckpttools.report import counted

PREVIOUS_SUFFIX = ".prev"  # weights/last.pt -> weights/last.prev.pt
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<tag>[a-z]+)-(?P<pid>\d+)\.tmp$")
FAULT_ENV = "CKPTTOOLS_FAULT"


_reached: dict[str, int] = {}


def fault(point: str) -> None:
    """The fault-injection hook: die like ``kill -9`` here when the environment asks for this point
    (``point``, ``point@N`` for its N-th passage in this process, ``point@N:THREAD`` counting only passages on
    the thread of that name, e.g. fuse-train's ``checkpoint-writer``)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or not wanted.startswith(point):
        return
    spec, _, thread = wanted.partition(":")
    name, _, nth = spec.partition("@")
    if name != point or (thread and threading.current_thread().name != thread):
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def temp_path(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """Where a temporary for ``path`` lives: beside it, named ``.<name>.<tag>-<pid>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that dead processes left in ``folder`` (a writer killed mid-write); returns them.
    Another live process's temporaries are left alone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = TEMPORARY.match(entry.name)
        if not m or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def clear_stale(folder: str | os.PathLike) -> list[str]:
    """``remove_stale``, said for a command's output: no line, or one naming how many and where."""
    stale = remove_stale(folder)
    return [f"removed {counted(len(stale), 'temporary file')} that killed writers left in {folder}"] if stale else []


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


def _publish(tmp: Path, path: Path, replace: bool) -> None:
    """``tmp`` becomes ``path``.  Without ``replace`` a ``path`` that appeared meanwhile (a concurrent writer)
    is never overwritten: link(2) refuses an existing name where rename(2) would replace it."""
    fault("before-rename")
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise UsageError(
                f"{path}: appeared while this was being written (another writer?); not replaced "
                "(pass --force to replace it)"
            ) from None
        tmp.unlink()
    fault("after-rename")
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", replace: bool = True) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it atomically becomes ``path``.  On an exception
    the temporary is removed and ``path`` is untouched.  ``replace=False``: never overwrite an existing path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _default_mode(path))
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            fault("before-fsync")
            os.fsync(handle.fileno())
        _publish(tmp, path, replace)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, verify: Callable[[Path], bool] | None = None, replace: bool = True
) -> Iterator[Path]:
    """Like ``atomic_write`` for writers that need a path (h5py, torch's DCP): yields a temporary path beside
    ``path`` that becomes ``path`` only if the body succeeds and ``verify(tmp)`` (if given) returns True."""
    path = Path(path)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if verify is not None and not verify(tmp):
            return
        with open(tmp, "rb+") as f:
            fault("before-fsync")
            os.fsync(f.fileno())
        _publish(tmp, path, replace)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_folder(out: Path, verify: Callable[[Path], bool] | None = None, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out``; when the body finishes (and ``verify(tmp)`` passes) it is fsynced and
    becomes ``out``.  An existing ``out`` (``replace``) is swapped out in one step, so a kill at any moment leaves
    the old folder or the new one under ``out``, and the old one is then removed."""
    out = Path(out)
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if verify is not None and not verify(tmp):
            return
        _fsync_tree(tmp)
        if out.exists() and not replace:
            raise UsageError(
                f"{out}: appeared while this was being written (another writer?); not replaced "
                "(pass --force to replace it)"
            )
        tmp = swap_in_folder(tmp, out) or tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in_folder(tmp: Path, out: Path) -> Path | None:
    """The complete, fsynced folder ``tmp`` becomes ``out`` in one step; returns where the old ``out`` now is
    (the caller removes or keeps it), or None when there was none.  Where renameat2 is missing the old folder is
    parked under a temporary name first (a moment without ``out``: readers fall back to the previous copy)."""
    fault("folder-before-swap")
    old = None
    if out.exists():
        if exchange(tmp, out):
            old = tmp
        else:
            old = temp_path(out, "old")
            os.replace(out, old)
            os.replace(tmp, out)
    else:
        os.rename(tmp, out)
    fault("folder-after-swap")
    fsync_dir(out.parent)
    return old


def link_folder(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of the folder ``src`` made of hard links (a copy where links fail), swapped in
    whole; an older ``dst`` is removed.  Safe because checkpoint folders are never modified, only replaced."""
    tmp = temp_path(dst, "link")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(src, tmp, copy_function=link)
    _fsync_tree(tmp)
    old = swap_in_folder(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_folder(staged: Path, out: Path) -> None:
    """``staged`` (complete, fsynced) becomes ``out``; the folder it replaces becomes ``previous_path(out)``,
    so at every moment ``out`` is a complete folder and the one before it is kept, as for files."""
    old = swap_in_folder(staged, out)
    if old is None:
        return
    prev = previous_path(out)
    fault("keep-previous")
    older = swap_in_folder(old, prev)
    if older is not None:
        shutil.rmtree(older, ignore_errors=True)


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
    tmp = _linked_temporary(path, prev)
    fault("keep-previous")
    os.replace(tmp, prev)
    tmp.unlink(missing_ok=True)  # still there only if rename(2) found both names on one inode (a race with us)
    fsync_dir(path.parent)
    return prev


def _linked_temporary(src: Path, dst: Path) -> Path:
    """A temporary beside ``dst`` holding ``src``'s bytes: a hard link, or a fsynced copy where links fail."""
    tmp = temp_path(dst, "link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return tmp


def copy_into_place(src: Path, dst: Path) -> None:
    """``dst`` becomes a complete copy of ``src`` (a hard link where possible: checkpoints are never modified in
    place, only replaced, so sharing an inode is safe)."""
    tmp = _linked_temporary(src, dst)
    if dst.exists() and os.path.samefile(src, dst):
        tmp.unlink()
        return
    _publish(tmp, dst, replace=True)


# ---- outputs of the commands that write ----------------------------------------------------------------------


class DiskFull(CkptError):
    """Not enough free space for an output; nothing was written."""


def ensure_space(out: Path, nbytes: int) -> None:
    """Refuse up front when ``out``'s filesystem cannot hold ``nbytes`` more (plus a margin for the container):
    a writer that runs out of space midway can only fail (and some libraries do so badly: h5py crashes)."""
    need = int(nbytes * 1.02) + (1 << 20)
    free = shutil.disk_usage(Path(out).parent).free
    if free < need:
        raise DiskFull(
            f"{out}: not enough space: the output needs about {need / 2**20:.1f} MiB, "
            f"{Path(out).parent} has {free / 2**20:.1f} MiB free; nothing was written"
        )


def is_dcp_folder(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def check_new_output(out: Path, inputs: Iterable[Path], force: bool, folder: bool = False) -> None:
    """Outputs go to a new path: never an input, never an existing path unless --force, and --force replaces only
    an output of the same kind (a file for a file, a DCP folder or an empty folder for a folder) that holds no
    input."""
    out = Path(out)
    inputs = [Path(p) for p in inputs]
    for src in inputs:
        if src.exists() and out.exists() and out.resolve() == src.resolve():
            raise UsageError(f"{out}: is the input; write the result to a new path (inputs are never modified)")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such folder for the output")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise UsageError(f"{out}: already exists; pass --force to replace it")
    if folder:
        if not out.is_dir() or out.is_symlink() or not (is_dcp_folder(out) or not any(out.iterdir())):
            raise UsageError(
                f"{out}: --force replaces only a DCP folder (with .metadata) or an empty folder; this "
                "one holds other things, and nothing in it is touched"
            )
        resolved = out.resolve()
        for src in inputs:
            if src.exists() and (resolved == src.resolve() or resolved in src.resolve().parents):
                raise UsageError(f"{out}: holds the input {src}; write the result somewhere else")
    elif not out.is_file():
        raise UsageError(f"{out}: is a folder, not a file; --force replaces only a file of the output's kind")
