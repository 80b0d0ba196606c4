"""Preemption as clusters deliver it (issue 23): signals to the whole process group at random moments,
SIGUSR1 saves, torchrun elastic restarts, and logs that never claim an epoch the checkpoint does not hold.

Every run here is the 3-epoch tiny run of ``reference_run`` (or ``ddp_reference`` for two processes), so an
interrupted and resumed run must end bitwise equal to it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ckpttools.commands.verify import verify
from tests.forkserver import ForkServer
from tests.helpers import TINY, load, run_train, tb_scalars, torchrun_command, training_state_differences

pytestmark = pytest.mark.slow  # end-to-end training runs

WORKERS = ["--workers", "2"]  # the default: the workers are in the process group and get its signals too


def _exp(cwd: Path) -> Path:
    return cwd / "runs" / "fuse" / "exp"


class Job:
    """``setsid fuse-train ...``: a process group of its own, as a scheduler's job is; stdout read line by line."""

    def __init__(self, argv: list[str], cwd: Path, env: dict | None = None):
        full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> bool:
        """True once a stdout line contains ``text``; False if the process ended first."""
        deadline = time.time() + timeout
        seen = 0
        while time.time() < deadline:
            while seen < len(self.lines):
                if text in self.lines[seen]:
                    return True
                seen += 1
            if self.proc.poll() is not None and seen >= len(self.lines):
                return False
            time.sleep(0.01)
        raise AssertionError(f"no line with {text!r} in {timeout} s:\n{''.join(self.lines)}")

    def signal_group(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)  # kill -SIG -- -PGID

    def finish(self, timeout: float = 180) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            raise
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    @property
    def out(self) -> str:
        return "".join(self.lines)


def _fuse_train(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fuse_train", *args]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_a_signal_to_the_process_group_saves_once_and_the_resume_is_exact(
    reference_run, tiny_data, tmp_path, signum, code
):
    """kill -SIG -- -PGID with DataLoader workers at random moments, an async save in flight most of the time
    (a save every step): the main process decides, prints one message, saves, exits 143 / 130."""
    rng = random.Random(f"group-{signum}")
    args = ["--data", str(tiny_data), *TINY, *WORKERS, "--save-period", "2", "--save-every", "1"]
    stopped = 0
    for attempt in range(4):
        cwd = tmp_path / f"try{attempt}"
        cwd.mkdir()
        job = Job(_fuse_train(args), cwd)
        assert job.wait_for("training mid fusion"), job.err
        time.sleep(rng.uniform(0.2, 2.5))
        job.signal_group(signum)
        result = job.finish()
        if result == 0:  # finished before the signal
            continue
        assert result == code, "".join(job.err)
        name = signal.Signals(signum).name
        assert job.out.count(f"{name} received") == 1, job.out  # once, though every process got it
        assert "DataLoader worker" not in "".join(job.err)
        last = _exp(cwd) / "weights" / "last.pt"
        assert not verify(last).errors
        resumed = run_train(["--resume", str(last), *WORKERS], cwd)
        assert resumed.returncode == 0, resumed.stderr
        assert training_state_differences(load(reference_run[0] / "weights" / "last.pt"), load(last)) == []
        assert (_exp(cwd) / "results.csv").read_text() == (reference_run[0] / "results.csv").read_text()
        stopped += 1
        if stopped == 2:
            return
    assert stopped >= 1, "the run always finished before the signal"


def test_sigusr1_saves_and_training_goes_on_and_a_stop_during_that_save_is_safe(reference_run, tiny_data, tmp_path):
    args = ["--data", str(tiny_data), *TINY, *WORKERS]
    job = Job(_fuse_train(args), tmp_path)
    assert job.wait_for("training mid fusion"), job.err
    time.sleep(0.5)
    job.signal_group(signal.SIGUSR1)
    assert job.wait_for("saved last.pt at step"), job.out + "".join(job.err)
    assert job.out.count("SIGUSR1 received") == 1
    last = _exp(tmp_path) / "weights" / "last.pt"
    saved_step = load(last)["progress"]["global_step"]
    assert not verify(last).errors and saved_step >= 1
    job.signal_group(signal.SIGUSR1)  # a second save request, then a stop while it is being written
    job.signal_group(signal.SIGTERM)
    result = job.finish()
    if result != 0:  # 0: the run ended between the two signals
        assert result == 143, "".join(job.err)
    assert not verify(last).errors
    if not load(last)["progress"]["finished"]:
        resumed = run_train(["--resume", str(last)], tmp_path)
        assert resumed.returncode == 0, resumed.stderr
    assert training_state_differences(load(reference_run[0] / "weights" / "last.pt"), load(last)) == []


def _epochs_in_results(run: Path) -> int:
    try:
        with open(run / "results.csv") as f:
            return len(list(csv.DictReader(f)))
    except FileNotFoundError:
        return 0


def test_fifty_kills_never_leave_logs_ahead_of_the_checkpoint(tiny_data, tmp_path):
    """kill -9 at 50 random moments of runs that save every step and end an epoch every 4 steps: after each,
    results.csv has no more epochs than last.pt, and no epoch scalar in TensorBoard is past last.pt's step.  Each
    run, resumed after every kill, finishes with the uninterrupted run's curves (TensorBoard, results.csv).
    Two lanes of 25 kills run side by side (one core each), each run forked from a lane's fork server
    (tests/forkserver.py: the imports paid once per lane, not per kill)."""
    args = ["--data", str(tiny_data), *TINY, "--epochs", "8", "--save-every", "1"]
    reference = tmp_path / "reference"
    reference.mkdir()
    assert run_train(args, reference, env={"OMP_NUM_THREADS": "1"}).returncode == 0  # as the lanes: sums depend on it
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        lanes = [
            pool.submit(_kill_lane, args, reference, tmp_path / f"lane{i}", random.Random(f"lane{i}"), 25)
            for i in range(2)
        ]
        assert sum(lane.result() for lane in lanes) == 50


def _kill_lane(args: list[str], reference: Path, folder: Path, rng: random.Random, kills_wanted: int) -> int:
    with ForkServer() as server:  # one compute thread per run, as the reference run
        return _kill_runs(server, args, reference, folder, rng, kills_wanted)


def _kill_runs(server, args: list[str], reference: Path, folder: Path, rng: random.Random, kills_wanted: int) -> int:
    run_no, kills, cwd = 0, 0, None
    while kills < kills_wanted:
        if cwd is None:
            run_no += 1
            cwd = folder / f"run{run_no}"
            cwd.mkdir(parents=True)
        last = _exp(cwd) / "weights" / "last.pt"
        if last.exists() and load(last)["progress"]["finished"]:  # killed after its final save: checked below
            cwd = None
            continue
        job = server.start(["--resume", str(last)] if last.exists() else args, cwd)
        job.wait_for(("resuming" if last.exists() else "training") + " mid fusion")
        time.sleep(rng.uniform(0.0, 1.0))
        job.kill()  # SIGKILL: nothing runs after it
        if job.finish() == 0:  # the run finished before the kill: check it, start another
            _assert_same_curves(reference, cwd)
            cwd = None
            continue
        kills += 1
        if not last.exists():
            assert _epochs_in_results(_exp(cwd)) == 0
            continue
        ckpt = load(last)
        assert _epochs_in_results(_exp(cwd)) <= len(ckpt["results"]), f"kill {kills}: results.csv ahead"
        step = ckpt["progress"]["global_step"]
        epoch_points = [
            s for tag, points in tb_scalars(_exp(cwd)).items() if tag.startswith("metrics/") for s, _ in points
        ]
        assert max(epoch_points, default=0) <= step, f"kill {kills}: an epoch in TensorBoard past step {step}"
    if cwd is not None:
        last = _exp(cwd) / "weights" / "last.pt"
        final = server.run(["--resume", str(last)] if last.exists() else args, cwd)
        assert final.returncode == 0, final.stderr
        _assert_same_curves(reference, cwd)
    return kills


def _assert_same_curves(reference: Path, cwd: Path) -> None:
    ours, theirs = tb_scalars(_exp(cwd)), tb_scalars(_exp(reference))
    assert ours == theirs, "TensorBoard curves differ from the uninterrupted run's"
    assert (_exp(cwd) / "results.csv").read_text() == (_exp(reference) / "results.csv").read_text()


# ---- torchrun: elastic restarts ------------------------------------------------------------------------------------


def _workers_of(launcher_pids: list[int]) -> list[int]:
    """The fuse-train processes started by the given torchrun agents (their children)."""
    found = []
    for pid in launcher_pids:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                if b"fuse_train" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(child)
            except OSError:
                pass
    return found


@contextlib.contextmanager
def _agents(argv: list[str], cwd: Path, env: dict, count: int):
    """``count`` torchrun agents, each in a process group of its own; whatever happens, no process of theirs
    outlives the test (a hung job left behind holds ports and disturbs later distributed runs)."""
    agents = [
        subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        for _ in range(count)
    ]
    try:
        yield agents
    finally:
        for agent in agents:
            try:
                os.killpg(agent.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            agent.wait()


def _kill_a_worker_twice(agents: list[subprocess.Popen], rng: random.Random, per_agent: int, cwd: Path) -> int:
    """kill -9 one worker at a random moment of training, twice (each time after the restarted workers are up).

    With two agents, not in the run's last epoch: once one worker has finished and exited 0, its torchrun
    agent has left the rendezvous for its exit barrier, so the other agent's restart waits for a peer that never
    comes (torchrun's rule, not the trainer's: no training code can answer it).  Before the last epoch's row is
    in results.csv no worker can have finished: every step of that epoch needs both.  So there the first kill
    comes at the random moment or, on a loaded machine, as soon as the first epoch's row appears, whichever is
    first; a restart is killed at its random moment unless the last epoch has begun by then."""
    two_agents = len(agents) > 1
    killed, previous = 0, set()
    deadline = time.time() + 240
    while killed < 2 and time.time() < deadline and all(a.poll() is None for a in agents):
        workers = set(_workers_of([a.pid for a in agents]))
        if len(workers) < per_agent * len(agents) or workers & previous:
            time.sleep(0.1)
            continue
        # start-up (imports, rendezvous) is about 2-3 s and a tiny --no-plots run 2-3 s more: a kill in training
        kill_at = time.time() + rng.uniform(2.5, 4.5)
        rows_by = 1 if _epochs_in_results(_exp(cwd)) == 0 else 2  # rows that end the wait (two agents only)
        while time.time() < kill_at and not (two_agents and _epochs_in_results(_exp(cwd)) >= rows_by):
            time.sleep(0.05)
        workers = _workers_of([a.pid for a in agents])
        if not workers:
            continue
        if two_agents and _epochs_in_results(_exp(cwd)) >= 2:  # the tiny run's third (last) epoch: see above
            break
        os.kill(rng.choice(workers), signal.SIGKILL)
        previous |= set(workers)
        killed += 1
    return killed


def _assert_final_is_the_reference(ddp_reference: Path, cwd: Path, kills: int) -> None:
    last = _exp(cwd) / "weights" / "last.pt"
    assert not verify(last).errors
    ckpt = load(last)
    assert ckpt["progress"]["finished"]
    assert training_state_differences(load(ddp_reference / "weights" / "last.pt"), ckpt) == []
    assert not (cwd / "runs" / "fuse" / "exp2").exists(), "a restart started a new run beside the old one"
    restarts = [h for h in ckpt["history"] if h.get("restart")]
    assert len(restarts) <= kills


def test_torchrun_max_restarts_continue_the_run_bitwise(ddp_reference, tiny_data, tmp_path):
    rng = random.Random("elastic")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = torchrun_command(
        ["--data", str(tiny_data), *TINY], launcher=["--standalone", "--nproc_per_node", "2", "--max-restarts", "2"]
    )
    with _agents(argv, tmp_path, env, 1) as agents:
        kills = _kill_a_worker_twice(agents, rng, per_agent=2, cwd=tmp_path)
        out, _ = agents[0].communicate(timeout=300)
    assert agents[0].returncode == 0, out[-4000:]
    assert kills >= 1, out[-2000:]
    _assert_final_is_the_reference(ddp_reference, tmp_path, kills)


def test_two_torchrun_agents_with_c10d_rendezvous_continue_the_run_bitwise(ddp_reference, tiny_data, tmp_path):
    """Two agents (--nnodes 2) on localhost; one agent's worker dies.  Only that agent counts a restart; the
    other restarts its worker with TORCHELASTIC_RESTART_COUNT=0, and the job id makes it continue the run too."""
    import socket

    rng = random.Random("two-agents")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--max-restarts",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"preempt-{port}",
    ]
    argv = torchrun_command(["--data", str(tiny_data), *TINY], launcher=launcher)
    with _agents(argv, tmp_path, env, 2) as agents:
        kills = _kill_a_worker_twice(agents, rng, per_agent=1, cwd=tmp_path)
        outs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), "\n----\n".join(o[-3000:] for o in outs)
    assert kills >= 1
    _assert_final_is_the_reference(ddp_reference, tmp_path, kills)


@pytest.mark.slow
def test_sigusr1_on_an_epochs_last_step_is_answered_by_the_epoch_end_save(tiny_data, tmp_path):
    """The epoch-end save is the one a SIGUSR1 on the epoch's last step asked for: it must still say so (the
    user was told "saving last.pt at the end of this step"), once, naming the step, and training goes on."""
    args = ["--data", str(tiny_data), *TINY]
    proc = run_train(args, tmp_path, env={"FUSE_TRAIN_SIGNAL_AFTER_STEP": "USR1:4"})  # 4 steps an epoch
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert out.count("SIGUSR1 received") == 1 and out.count("saved last.pt at step 4 (SIGUSR1)") == 1, out
    assert load(_exp(tmp_path) / "weights" / "last.pt")["progress"]["finished"]
