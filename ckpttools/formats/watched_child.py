"""Run a reader in a child interpreter and stop it when it stops making progress.

Some file formats are parsed by C libraries that trust the bytes: libhdf5 spins forever in
``H5HG__cache_heap_deserialize`` on a global heap with one object header zeroed (found by mutating our own
converted files), holding the GIL, so no timer in the process that called it can stop it.  A child interpreter
can be stopped.  The child writes a byte now and then while it works (``Heartbeat``) and its answer at the end;
the parent gives up only after ``seconds`` without a byte, so a large intact file takes as long as it takes and
a loop is stopped ``seconds`` after it began.

A fresh interpreter, not a fork: a fork of a process with threads (torch's pools, a pickle scan beside) can
inherit a lock that is held forever.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

SILENCE_SECONDS = 30.0  # how long a child may go without a sign of progress
SECONDS_VARIABLE = "CKPTTOOLS_CHILD_SILENCE_SECONDS"  # another limit (a slow network disk; tests)
ANSWER = b"\n"  # heartbeats are b"."; the answer follows the first newline
BEAT_EVERY = 0.25  # seconds between heartbeats


def silence_seconds() -> float:
    try:
        return max(0.1, float(os.environ.get(SECONDS_VARIABLE, SILENCE_SECONDS)))
    except ValueError:
        return SILENCE_SECONDS


class Heartbeat:
    """The child's side: ``beat()`` as often as convenient writes a byte at most every BEAT_EVERY seconds."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout.buffer
        self.next = 0.0
        self.beat()  # started: the imports are done

    def beat(self) -> None:
        now = time.monotonic()
        if now >= self.next:
            self.stream.write(b".")
            self.stream.flush()
            self.next = now + BEAT_EVERY

    def answer(self, payload: bytes) -> None:
        self.stream.write(ANSWER + payload)
        self.stream.flush()


def run_watched(module: str, argument: str, seconds: float | None = None) -> tuple[bytes | None, str | None]:
    """``python -m module argument`` in a child: (its answer, None) when it finishes, (None, what happened) when
    it went ``seconds`` without progress (stopped) or died of a signal, (None, None) when it exited with an
    error of its own (the caller reads in-process, where the error surfaces as it always did)."""
    seconds = seconds or silence_seconds()
    # the child imports what this process imports (a checkout on sys.path, not only an installed package)
    paths = os.pathsep.join(p for p in sys.path if p)
    child = subprocess.Popen(
        [sys.executable, "-m", module, argument],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": paths},
    )
    received, finished = bytearray(), False
    try:
        finished = _read_until_eof(child, received, seconds)
    finally:
        if not finished:  # silent past the limit (or this process interrupted): stopped
            child.kill()
        try:
            child.wait(timeout=seconds)  # a finished child is exiting (its output closes as it exits)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()
    if not finished:
        return None, f"stopped after {seconds:g} s without progress (a damaged structure makes the library loop)"
    if child.returncode < 0:
        return None, f"the reading process died of {signal.Signals(-child.returncode).name} (the library crashed)"
    start = received.find(ANSWER)
    if child.returncode != 0 or start < 0:
        return None, None
    return bytes(received[start + 1 :]), None


def _read_until_eof(child: subprocess.Popen, received: bytearray, seconds: float) -> bool:
    """Collect the child's output; False when ``seconds`` pass without a byte."""
    fd = child.stdout.fileno()
    waiting = select.poll()  # not select(): a process with 1,024 files open gets descriptors it cannot take
    waiting.register(fd, select.POLLIN | select.POLLHUP)
    while True:
        if not waiting.poll(seconds * 1000):
            return False
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return True
        received += chunk
