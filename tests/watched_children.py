"""Children for tests/test_watched_child.py: ``python -m tests.watched_children MODE``."""

from __future__ import annotations

import os
import signal
import sys
import time

from ckpttools.formats.watched_child import Heartbeat

if __name__ == "__main__":
    mode = sys.argv[1]
    heartbeat = Heartbeat()
    if mode == "steady":  # works for 2.5 s, never silent for long: answered however long it takes
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            time.sleep(0.01)
            heartbeat.beat()
        heartbeat.answer(b"done")
    elif mode == "silent":  # a loop that never reports
        while True:
            time.sleep(1)
    elif mode == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif mode == "error":
        raise ValueError("an ordinary error")
