"""The static scan of a large pickle, run in a forked child process while this one reads the rest of the file.

The scan (``scan.scan_pickle``) walks every opcode in Python: a torch state dict of 200,000 tensors is six
million opcodes and about three seconds, as long as the rest of ``ckpt verify`` together.  The two are
independent by construction: the restricted unpickler runs nothing of the pickle whatever it contains (see
``unpickler``), and the verdict is taken from the scan only when a command asks for it (``Checkpoint.safety``).
So on a machine with a second core the scan runs beside the unpickling, zip checks and CRC work.

Where forking is not safe or not worth it the scan runs here, in line, with the same result: a small pickle
(a child costs a few milliseconds), a platform other than Linux (macOS frameworks are not fork-safe), a
process with other Python threads (a lock held by one of them stays held in the child), or one that has
imported torch (its thread pools do not survive a fork).  A child that fails for any reason (killed, out of
memory) is replaced by the in-line scan: the verdict never depends on the child.

The child sends its ``PickleScan`` back through a pipe as a pickle: our own objects, written by our own
process, never a byte of the checkpoint.

Where the caller can read the bytes again (``reread``: a record of the file), this process keeps only their
xxh3-128 while the child works, not the bytes (20 MB for a pickle of 200,000 tensors, 40 MB in a ``diff`` of
two): the fallback reads them again and scans them only if they are the very bytes that were unpickled; bytes
that changed meanwhile make a scan whose problem says so (unsafe: the pickle read was never scanned).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable

from xxhash import xxh3_128_digest

from ckpttools.pickle.scan import scan_pickle
from ckpttools.pickle.scan_model import PickleScan

IN_BACKGROUND_FROM = 4 << 20  # bytes of pickle; below this the in-line scan takes well under 0.1 s


class PendingScan:
    """A scan running in a child process; ``result()`` waits for it (once) and returns the ``PickleScan``."""

    def __init__(self, data: bytes, pid: int, fd: int, reread: Callable[[], bytes] | None = None):
        # for the in-line fallback: the bytes, or where they can be read again, only their digest
        self._data: bytes | None = data if reread is None else None
        self._reread, self._digest = reread, xxh3_128_digest(data) if reread is not None else None
        self._pid, self._fd = pid, fd
        self._result: PickleScan | None = None

    def __del__(self):  # never asked for (the command failed first): stop the child rather than leave it
        if self._result is None and self._pid:
            for step in (lambda: os.kill(self._pid, signal.SIGKILL), lambda: os.waitpid(self._pid, 0)):
                with contextlib.suppress(OSError):  # each on its own: a child already gone is still reaped
                    step()
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def result(self) -> PickleScan:
        if self._result is None:
            self._result = self._collect()
            self._data = self._reread = None
        return self._result

    def _scan_here(self) -> PickleScan:
        """The in-line scan, of the very bytes that were handed to the child."""
        if self._data is not None:
            return scan_pickle(self._data)
        try:
            data = self._reread()
        except OSError as exc:
            return PickleScan(problems=[f"the pickle could not be read again to be scanned: {exc}"])
        if xxh3_128_digest(data) != self._digest:
            return PickleScan(problems=["the pickle changed while it was read: the bytes read were never scanned"])
        return scan_pickle(data)

    def _collect(self) -> PickleScan:
        chunks = []
        try:
            with os.fdopen(self._fd, "rb") as pipe:
                while chunk := pipe.read(1 << 20):
                    chunks.append(chunk)
        finally:
            _, status = os.waitpid(self._pid, 0)
            self._pid = 0
        if status == 0 and chunks:
            try:
                scan = pickle.loads(b"".join(chunks))  # noqa: S301 - our own child's result, see the module docstring
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError):
                scan = None
            if isinstance(scan, PickleScan):
                return scan
        return self._scan_here()


def _can_fork() -> bool:
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "fork")
        and threading.active_count() == 1
        and "torch" not in sys.modules
    )


def start_scan(data: bytes, reread: Callable[[], bytes] | None = None) -> PickleScan | PendingScan:
    """The scan of ``data``: finished (small pickles, or where a child cannot be forked) or pending.
    ``reread``: reads ``data`` again from where it came (then it is not kept while the child scans)."""
    if len(data) < IN_BACKGROUND_FROM or not _can_fork():
        return scan_pickle(data)
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:  # no processes or memory left for a child: scan here
        os.close(read_end)
        os.close(write_end)
        return scan_pickle(data)
    if pid == 0:  # the child: scan, send, leave without running the parent's exit handlers or flushing its buffers
        code = 1
        try:
            os.close(read_end)
            payload = pickle.dumps(scan_pickle(data), protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
            code = 0
        except BaseException:  # noqa: BLE001 - Ctrl-C, a closed pipe: the parent scans in line instead
            pass
        finally:
            os._exit(code)
    os.close(write_end)
    return PendingScan(data, pid, read_end, reread)


def settled(scan: PickleScan | PendingScan) -> PickleScan:
    return scan.result() if isinstance(scan, PendingScan) else scan
