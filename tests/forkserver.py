"""A fork server for the kill tests: fuse-train's imports paid once, every run still a process of its own.

The kill tests start fuse-train 10 to 60 times each, and 2.4 s of every start is importing torch and
torch._dynamo (the optimizer's first step imports the compiler even when nothing compiles).  Under the full
suite that was a fifth of all CPU time.  Here one server process imports what a training run imports, then
forks a child per run: the child runs the real ``fuse-train`` command line from its first line (argument
parsing, the resume's verify and preflight, the training loop, the saves, the exit) in its own folder with
its own environment, stdout and stderr, and is killed with a real SIGKILL or kills itself at a fault point
(CKPTTOOLS_FAULT).  Only the interpreter's imports are shared.

Tests about how a signal reaches a process group, torchrun restarts, or the start-up itself keep starting
fresh interpreters (``tests/faults/test_preemption.py``'s ``Job``, ``tests/helpers.run_train``).

Protocol: one JSON request per line on the server's stdin, one JSON reply per line on its stdout.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FUSE_TRAIN = "fuse_train.cli:main"
# what a fuse-train run imports before its first step (torch.distributed.checkpoint for --save-format dcp)
FUSE_TRAIN_IMPORTS = [
    "torch",
    "torch._dynamo",
    "torch.distributed.checkpoint",
    "torch.utils.tensorboard",
    "fuse_train.cli",
    "fuse_train.commands",
    "fuse_train.training.trainer",
    "fuse_train.checkpoint.dcp_save",
    "ckpttools.commands.verify",
    "ckpttools.commands.preflight",
]


@dataclass
class CompletedRun:
    returncode: int
    stdout: str
    stderr: str


class ForkedRun:
    """One fuse-train run forked from the server: the interface of the ``Job`` / ``Popen`` it replaces."""

    def __init__(self, server: ForkServer, pid: int, out: Path, err: Path):
        self.server, self.pid, self._out, self._err = server, pid, out, err
        self.returncode: int | None = None

    @property
    def stdout(self) -> str:
        return self._out.read_text(errors="replace") if self._out.exists() else ""

    @property
    def stderr(self) -> str:
        return self._err.read_text(errors="replace") if self._err.exists() else ""

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.ask({"op": "wait", "pid": self.pid, "timeout": 0})["code"]
        return self.returncode

    def wait_for(self, text: str, timeout: float = 120) -> bool:
        """True once a stdout line contains ``text``; False if the run ended without one."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.stdout:
                return True
            if self.poll() is not None:
                return text in self.stdout
            time.sleep(0.01)
        raise AssertionError(f"no line with {text!r} in {timeout} s:\n{self.stdout}")

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)  # nothing runs after it

    def finish(self, timeout: float = 300) -> int:
        if self.returncode is None:
            code = self.server.ask({"op": "wait", "pid": self.pid, "timeout": timeout})["code"]
            if code is None:
                self.kill()
                raise AssertionError(f"the forked run did not end in {timeout} s:\n{self.stderr[-2000:]}")
            self.returncode = code
        return self.returncode


class ForkServer:
    """``with ForkServer(env) as server: server.start([...], cwd)``; one request at a time (one per thread).

    ``entry`` is the command each child runs (``module:function``, called with the argument list), ``preload``
    the modules imported (or ``module:function`` called) once in the server, ``path`` folders put first on its
    ``sys.path``."""

    def __init__(
        self,
        env: dict | None = None,
        entry: str = FUSE_TRAIN,
        preload: list[str] = FUSE_TRAIN_IMPORTS,
        path: list[str] = (),
    ):
        full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        setup = json.dumps({"entry": entry, "preload": list(preload), "path": [str(p) for p in path]})
        self.proc = subprocess.Popen(
            [sys.executable, __file__, setup], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full
        )
        self.runs, self.logs = 0, Path(tempfile.mkdtemp(prefix="forked-runs-"))  # outside the run folders
        assert self.ask({"op": "ping"}) == {"ready": True}

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the fork server ended (exit {self.proc.wait()})")
        return json.loads(line)

    def start(self, args: list[str], cwd: Path, env: dict | None = None) -> ForkedRun:
        self.runs += 1
        out, err = self.logs / f"{self.runs}.out", self.logs / f"{self.runs}.err"
        request = {"argv": args, "cwd": str(cwd), "env": env or {}, "out": str(out), "err": str(err)}
        reply = self.ask({"op": "start", **request})
        return ForkedRun(self, reply["pid"], out, err)

    def run(self, args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> CompletedRun:
        """As ``tests.helpers.run_train``: to the end, then the exit code and both outputs."""
        forked = self.start(args, cwd, env)
        code = forked.finish(timeout)
        return CompletedRun(code, forked.stdout, forked.stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        shutil.rmtree(self.logs, ignore_errors=True)

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the server side (this file run as a script) ----


def _resolve(name: str):
    module, _, function = name.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, function) if function else loaded


def _child(entry, request: dict) -> None:
    """In the forked child: become the command run with ARGV in ``cwd``; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["out"]), (2, request["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = [entry.__module__, *request["argv"]]
        result = entry(request["argv"])
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        import atexit

        atexit._run_exitfuncs()  # as an interpreter that exits: logging flushed, multiprocessing children joined
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)  # -9 for a SIGKILL, as subprocess reports it
        if time.time() >= deadline:
            return None
        time.sleep(0.005)


def serve(setup: dict) -> None:
    sys.path[:0] = setup["path"]
    for name in setup["preload"]:
        loaded = _resolve(name)
        if ":" in name:
            loaded()
    entry = _resolve(setup["entry"])
    replies = os.fdopen(os.dup(1), "w")  # fd 1 itself is pointed at /dev/null: a child must not write replies
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                replies.close()
                _child(entry, request)
            reply = {"pid": pid}
        elif request["op"] == "wait":
            reply = {"code": _wait(request["pid"], request["timeout"])}
        else:
            reply = {"ready": True}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
