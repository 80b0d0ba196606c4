"""One process per run folder: an advisory lock (``fcntl.flock`` on ``<run>/.lock``) held while a run trains.

A second ``fuse-train`` on the same folder (a fresh run with the same ``--name`` started at the same time, or
a second ``--resume``) is refused with one line naming the holder.  The kernel drops the lock when its
process dies, however it dies, so the lock of a killed run is taken over without any clean-up.  Under torchrun
only rank 0 takes it: the other ranks belong to the same run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class RunLocked(Exception):
    """Another live process holds the run folder."""


@contextlib.contextmanager
def run_lock(run_dir: Path, take: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body; ``take=False`` (ranks other than 0) does nothing."""
    if not take:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _locked(run_dir, fd) from None
        os.ftruncate(fd, 0)
        stamp = dt.datetime.now().isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_unlocked(run_dir: Path) -> None:
    """Raise RunLocked now if a live process holds ``run_dir`` (nothing is created or written): a resume is
    refused before it reads a checkpoint that process may be replacing.  A shared lock, held for the probe only:
    probes never block each other; the run's own lock is still taken before its first write."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:  # no lock file (or no folder): nobody holds it
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _locked(run_dir, fd) from None
    finally:
        os.close(fd)  # releases the probe


def _locked(run_dir: Path, fd: int) -> RunLocked:
    holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
    return RunLocked(
        f"{run_dir}: in use by {holder}; one process per run folder (wait for it, stop it, or pick another --name)"
    )
