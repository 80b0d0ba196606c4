import os
import sys
from pathlib import Path

# One compute thread per process, here and in every trainer the tests start: the suite runs two workers on two
# cores, each starting trainers (and torchrun ranks); processes that each take every core make OpenMP's threads
# spin against each other (a test that takes 6 s alone took 85 s that way).  Runs compared bit for bit all use
# the same count.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402 - after the thread count, which torch reads when it is imported
import torch  # noqa: E402

from fuse_train.data.demo import write_demo  # noqa: E402
from tests.schedule import longest_first  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    items[:] = longest_first(items)  # the xdist workers take modules in this order (tests/schedule.py)


@pytest.fixture(scope="module", autouse=True)
def _ultralytics_stays_out_of_test_processes(request):
    yield
    # importing Ultralytics patches PIL.Image.open (and more) for the whole process, so the data tests run after
    # it on the same worker would see it: tests run Ultralytics in processes of their own (the driver)
    assert "ultralytics" not in sys.modules, f"{request.module.__name__} imported ultralytics into the test process"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small demo dataset (16 train / 8 val pairs of 64 px) shared by the session's tests."""
    return write_demo(tmp_path_factory.mktemp("tiny_demo"), n_train=16, n_val=8, size=64, seed=1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # never touch the user's ~/.cache from tests
    monkeypatch.setenv("FUSE_TRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def reference_run(tiny_data, tmp_path_factory):
    """One uninterrupted 3-epoch run (4 steps an epoch), shared by the tests that compare against it."""
    from tests.helpers import TINY, run_train

    cwd = tmp_path_factory.mktemp("ref")
    proc = run_train(["--data", str(tiny_data), *TINY, "--save-period", "2"], cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "runs" / "fuse" / "exp", proc


@pytest.fixture(scope="session")
def ddp_reference(tiny_data, tmp_path_factory):
    """The same 3-epoch run as two processes (torchrun, gloo), uninterrupted."""
    from tests.helpers import TINY, run_torchrun

    cwd = tmp_path_factory.mktemp("ddp_ref")
    proc = run_torchrun(["--data", str(tiny_data), *TINY], cwd)
    assert proc.returncode == 0, proc.stderr[-8000:]
    return cwd / "runs" / "fuse" / "exp"
