"""Signals handled the same however they arrive, and restarts that find their run (fuse_train.process.signals,
fuse_train.launch.relaunch).  The end-to-end runs are in tests/faults/test_preemption.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fuse_train.launch.relaunch import (
    job_identity,
    launch_record,
    newest_last,
    relaunched_run,
    restart_reason,
    run_folders,
    write_launch,
)
from fuse_train.process.signals import SignalState, exit_code


@pytest.mark.parametrize(
    "env, reason",
    [
        ({}, None),
        ({"TORCHELASTIC_RESTART_COUNT": "0"}, None),
        ({"TORCHELASTIC_RESTART_COUNT": "2"}, "torchrun restart 2"),
        ({"SLURM_RESTART_COUNT": "1"}, "Slurm requeue 1"),
        ({"TORCHELASTIC_RESTART_COUNT": "", "SLURM_RESTART_COUNT": "x"}, None),
    ],
)
def test_restart_reason(env, reason):
    assert restart_reason(env) == reason


@pytest.mark.parametrize(
    "env, job",
    [
        ({}, ""),
        ({"TORCHELASTIC_RUN_ID": "none"}, ""),  # torchrun's default id: every job without --rdzv-id has it
        ({"TORCHELASTIC_RUN_ID": "abc"}, "torchrun:abc"),
        ({"SLURM_JOB_ID": "4242"}, "slurm:4242"),
        ({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "7"}, "slurm:7"),
    ],
)
def test_job_identity(env, job):
    assert job_identity(env) == job


def test_a_restart_finds_the_last_folder_this_launch_started(tmp_path):
    project = tmp_path / "runs"
    mine = launch_record({"epochs": 5, "name": "exp"}, {"TORCHELASTIC_RUN_ID": "j1"})
    other_job = launch_record({"epochs": 5, "name": "exp"}, {"TORCHELASTIC_RUN_ID": "j0"})
    other_options = launch_record({"epochs": 6, "name": "exp"}, {"TORCHELASTIC_RUN_ID": "j1"})
    for folder, record in (("exp", other_job), ("exp2", mine), ("exp3", other_options), ("exp4", mine), ("exp5", None)):
        (project / folder / "weights").mkdir(parents=True)
        if record:
            write_launch(project / folder, record)
    assert [p.name for p in run_folders(str(project), "exp")] == ["exp", "exp2", "exp3", "exp4", "exp5"]
    assert relaunched_run(str(project), "exp", mine) == project / "exp4"  # the most recent of this launch
    assert relaunched_run(str(project), "exp", launch_record({"epochs": 9}, {})) is None
    assert newest_last(project / "exp4") is None
    (project / "exp4" / "weights" / "last.pt").write_bytes(b"x")
    assert newest_last(project / "exp4") == project / "exp4" / "weights" / "last.pt"
    # JSON round trip: what was written is what a restart compares
    assert json.loads((project / "exp4" / "launch.json").read_text()) == mine


def test_one_message_per_signal_and_sigusr1_asks_for_one_save():
    said = []
    state = SignalState(said.append)
    state.handle(signal.SIGUSR1)
    state.handle(signal.SIGUSR1)  # a second request before the save: one save, one line
    assert state.save_requested and len(said) == 1 and "SIGUSR1" in said[0]
    state.handle(signal.SIGTERM)
    assert state.stop == signal.SIGTERM and len(said) == 2 and "SIGTERM received" in said[1]
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130


def test_a_second_stop_signal_exits_at_once():
    code = textwrap.dedent("""
        import os, signal, time
        from fuse_train.process.signals import SignalState
        state = SignalState(print)
        state.install()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        print("stopping", state.stop)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143 and "stopping 2" in proc.stdout and "not reached" not in proc.stdout
    assert "second stop signal" in proc.stderr


WORKERS_UNDER_FIRE = """
import os, signal, sys, time
import torch
from fuse_train.process.signals import SignalState, loader_batches, worker_init

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 12
    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.tensor([i])

received = []
state = SignalState(lambda message: None)
signal.signal(signal.SIGTERM, lambda s, f: received.append(s))  # count them; the trainer would stop instead
signal.signal(signal.SIGUSR1, lambda s, f: received.append(s))
loader = torch.utils.data.DataLoader(Slow(), batch_size=3, num_workers=2, worker_init_fn=worker_init)
print("ready", flush=True)
batches = 0
for epoch in range(int(sys.argv[1])):  # new workers every epoch: signals land during forks too
    for batch in loader_batches(loader):
        batches += 1
print("batches", batches, "received", len(received), flush=True)
"""


def _fire_at_workers(script_text: str, tmp_path: Path, rng: random.Random, epochs: int):
    script = tmp_path / "fire.py"
    script.write_text(script_text)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(epochs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout.readline().strip() == "ready"
    sent = 0
    while proc.poll() is None and sent < 40:
        time.sleep(rng.uniform(0.0, 0.05))
        try:
            os.killpg(proc.pid, rng.choice([signal.SIGTERM, signal.SIGUSR1]))
        except ProcessLookupError:
            break
        sent += 1
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err, sent


def test_dataloader_workers_survive_signals_to_the_group_at_random_moments(tmp_path):
    """kill -SIG -- -PGID at random moments, while workers are forked and while they work: no worker dies (a
    dead worker raises in the main process), every batch arrives, the main process gets the signals."""
    rng = random.Random(os.environ.get("PYTEST_SEED", "workers"))
    epochs = 12
    code, out, err, sent = _fire_at_workers(WORKERS_UNDER_FIRE, tmp_path, rng, epochs)
    assert code == 0, err[-2000:]
    words = out.split()
    assert words[:2] == ["batches", str(epochs * 4)], out
    assert sent >= 10 and 1 <= int(words[3]) <= sent  # standard signals may coalesce, never multiply


def test_negative_control_plain_workers_die_of_the_same_signals(tmp_path):
    """The same fire at a DataLoader without worker_init / loader_batches: torch's workers die of it."""
    plain = WORKERS_UNDER_FIRE.replace("worker_init_fn=worker_init", "worker_init_fn=None").replace(
        "loader_batches(loader)", "iter(loader)"
    )
    code, out, err, sent = _fire_at_workers(plain, tmp_path, random.Random("plain"), 12)
    assert code != 0 and "batches" not in out and "DataLoader worker" in err
