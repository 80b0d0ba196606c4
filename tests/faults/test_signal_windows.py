"""The edges of a run, where no loop handler is installed: a stop signal to the process group while fuse-train
starts (imports, dataset survey, model) or while it exits after its last save.  Either is one line and
128 + the signal (before training: no checkpoint written), or the finished run's exit 0: never a death by the
signal (-2 / -15), a traceback, or a finished run reported as killed."""

from __future__ import annotations

import random
import signal
import time

import pytest

from ckpttools.commands.verify import verify
from tests.faults.test_preemption import Job, _exp, _fuse_train
from tests.helpers import TINY, load

pytestmark = pytest.mark.slow  # starts training runs


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_a_stop_while_starting_or_exiting_is_one_line_and_a_clean_code(tiny_data, tmp_path, signum, code):
    rng = random.Random(f"edges-{signum}")
    args = ["--data", str(tiny_data), *TINY]
    # while starting: at a random moment before the "training" line (the loop's handlers are not in yet)
    (tmp_path / "s").mkdir()
    starting = Job(_fuse_train(args), tmp_path / "s")
    time.sleep(rng.uniform(0.4, 1.0))  # past the interpreter's start, inside the imports (torch alone takes ~1 s)
    assert not any("training" in line for line in starting.lines), "started before the signal: too slow a machine?"
    starting.signal_group(signum)
    assert starting.finish() == code, starting.err
    assert "before training started" in "".join(starting.err) and "Traceback" not in "".join(starting.err)
    assert not list((tmp_path / "s").rglob("*.pt"))
    # while exiting: right after the last line, the run finished and saved; the signal changes nothing
    (tmp_path / "e").mkdir()
    exiting = Job(_fuse_train(args), tmp_path / "e")
    assert exiting.wait_for("done: best fitness")
    exiting.signal_group(signum)
    assert exiting.finish() == 0, exiting.err
    last = _exp(tmp_path / "e") / "weights" / "last.pt"
    assert load(last)["progress"]["finished"] and verify(last).ok
