"""Signals handled the same however they arrive: to the process, to its whole process group, from torchrun.

Clusters stop a job by signalling every process of it: ``timeout(1)``, Slurm and a Kubernetes shell entrypoint
send SIGTERM to the process group, which holds the DataLoader workers too; a terminal's Ctrl-C does the same
with SIGINT.  The rule is that **the main process decides** and workers carry on until it shuts them down:

* ``SIGINT`` / ``SIGTERM``: the main process finishes the step, waits for a save in flight, writes the
  resumable checkpoint, then shuts its workers down (exit 130 / 143).  A second stop signal ends it at once
  (the checkpoint being written is only a temporary file until its rename, so the last one stays whole).
* ``SIGUSR1`` (Slurm's ``--signal=USR1@90`` warning): save a resumable checkpoint now and keep training.
* DataLoader workers ignore them, except a SIGTERM from their parent.  torch installs a C handler in each
  worker that exits on a SIGTERM from the parent and re-raises any other, so a group SIGTERM used to kill the
  workers and end the run with "DataLoader worker is killed by signal" before anything was saved.  In
  ``worker_init`` SIGINT / SIGUSR1 are ignored and SIGTERM stays blocked: a thread takes it with
  ``sigwaitinfo``, which tells the sender, and exits the worker only when the parent sent it (multiprocessing
  terminates leftover workers so at exit; ignoring that too would hang the exit).  The signals are blocked in
  the main thread while workers are forked (``workers_started``), so none reaches a worker between its fork
  and ``worker_init``.  A worker whose parent has died still exits: torch's watchdog checks every few seconds.
* Each signal's message is printed once, by the main process of rank 0.
* Before the loop's handlers are installed (imports, the dataset survey, the preflight) a stop signal ends the
  command with one line and 128 + its number, no checkpoint written (``stop_before_training``); after the run has
  ended, its outcome saved and its exit code decided, a stop signal ends the process at once with that code
  (``stop_after_run``): a Ctrl-C while a finished run exits must not turn it into a killed one, and a
  launcher's SIGTERM must still end a worker that waits on a dead peer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAVE_SIGNAL = signal.SIGUSR1
HANDLED = (*STOP_SIGNALS, SAVE_SIGNAL)


def exit_code(signum: int) -> int:
    """128 + the signal number, as a shell reports a process a signal ended: SIGINT 130, SIGTERM 143."""
    return 128 + int(signum)


_loop_started = False  # set when the loop installs its handlers; the start-up handler is put back after it
_late_signal: int | None = None  # a stop signal between the loop's end and stop_after_run


def _stop_before_training(signum: int, frame=None) -> None:
    global _late_signal
    if _loop_started:  # the loop has ended and put this handler back: stop_after_run answers it
        _late_signal = signum
        return
    # exit at once, not by an exception: one raised inside an import (torch's takes a second) leaves the module
    # half-initialised and the error path that follows fails on it
    name = signal.Signals(signum).name
    os.write(2, f"fuse-train: {name} before training started: exiting; no checkpoint was written or changed\n".encode())
    os._exit(exit_code(signum))


def stop_before_training() -> None:
    """From the command's start until the loop installs its handlers: a stop signal ends the process with one
    line and 128 + its number (SIGINT and SIGTERM alike); a save signal has nothing to save yet."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop_before_training)
    signal.signal(SAVE_SIGNAL, signal.SIG_IGN)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` at once, what was printed flushed to its pipe first: no exit handlers and no
    C++ static destructors (see stop_after_run and the CLI's end of a multi-process run)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def stop_after_run(code: int) -> None:
    """The run has ended, its outcome saved and its exit code decided: a stop signal during the exit (a launcher
    tearing down, a late Ctrl-C) ends the process at once with that code, never as killed by the signal (a
    finished run stays a success) and never ignored (a launcher's SIGTERM is how it ends a worker that waits on
    a dead peer); a save signal has nothing left to save."""

    def stop(signum: int, frame=None) -> None:
        exit_now(code)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    signal.signal(SAVE_SIGNAL, signal.SIG_IGN)
    if _late_signal is not None:
        stop(_late_signal)


class SignalState:
    """What the signals asked of the training loop: ``stop`` (the first stop signal) and ``save_requested``.

    ``install()`` sets the handlers in the main process and returns a function that puts the previous ones back.
    ``say`` prints one line (rank 0's console); it is called once per signal received."""

    def __init__(self, say: Callable[[str], None], last_name: str = "last.pt"):
        self.say, self.last_name = say, last_name
        self.stop: int | None = None
        self.save_requested = False

    def handle(self, signum: int, frame=None) -> None:
        if signum == SAVE_SIGNAL:
            if not self.save_requested and self.stop is None:
                self.save_requested = True
                self.say(f"SIGUSR1 received: saving {self.last_name} at the end of this step; training continues")
            return
        if self.stop is not None:
            # A second stop signal: leave now.  A save in flight is a temporary file until its rename, so the
            # last complete checkpoint stays whole; the next run removes the temporary file.
            os.write(2, b"\nsecond stop signal: exiting now; weights/last is the last complete save\n")
            os._exit(exit_code(signum))
        self.stop = signum
        self.say(
            f"\n{signal.Signals(signum).name} received: finishing this step and saving {self.last_name} "
            "(a second signal exits at once)"
        )

    def install(self) -> Callable[[], None]:
        global _loop_started
        _loop_started = True
        previous = {s: signal.signal(s, self.handle) for s in HANDLED}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


def _ignore_in_worker(signum: int, frame=None) -> None:
    """A DataLoader worker's handler: the main process decides; a worker whose parent is gone leaves."""
    if os.getppid() != _worker_parent:
        os._exit(0)


_worker_parent = os.getppid()


def _sigterm_by_sender() -> None:
    """A worker's SIGTERM, taken with its sender: the parent's (multiprocessing's terminate) ends the worker as
    torch's own handler would; anyone else's (the job's process group) is the main process's business."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == os.getppid() or os.getppid() != _worker_parent:
            os._exit(0)


def worker_init(worker_id: int = 0) -> None:
    """First thing in every DataLoader worker (``worker_init_fn``): ignore SIGINT / SIGUSR1 (pending ones too,
    once unblocked); leave SIGTERM blocked for ``_sigterm_by_sender``."""
    global _worker_parent
    _worker_parent = os.getppid()
    for signum in HANDLED:
        # SIGTERM keeps a handler, not SIG_IGN (which would discard it before sigwaitinfo sees it): it catches a
        # SIGTERM that reaches a thread of this worker where it is not blocked
        signal.signal(signum, _ignore_in_worker)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_sigterm_by_sender, name="sigterm-by-sender", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, SAVE_SIGNAL})


@contextlib.contextmanager
def workers_started() -> Iterator[None]:
    """Block the handled signals in this thread while DataLoader workers are forked (they inherit the mask and
    unblock in ``worker_init``); signals that arrive meanwhile are delivered when the block ends."""
    if sys.platform == "win32":  # no fork, no sigmask
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def loader_batches(loader) -> Iterator:
    """``iter(loader)`` with its workers started under ``workers_started``."""
    with workers_started():
        return iter(loader)
