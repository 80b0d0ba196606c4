"""--save-format dcp without training: where a resume finds its checkpoint, that a DCP run folder is never
reused by a fresh run, and that a weaponised last.dcp is refused before torch's DCP loader could run it.
The training runs (single process with kills, and DDP over gloo) are in tests/faults/test_async_saves.py and
tests/test_remap.py."""

from __future__ import annotations

import os
import time
import warnings

import pytest

from ckpttools.errors import CkptError
from fuse_train.checkpoint.reading import load_folder
from fuse_train.config import RunConfig
from fuse_train.launch.resume import ResumeError, find_last, fresh_run_dir, load_checkpoint
from tests.security.corpus import dcp_folder, dumps, system, touch


def _dcp_run(project, name: str):
    weights = project / name / "weights"
    weights.mkdir(parents=True)
    (weights / "last.dcp").mkdir()
    (weights / "last.dcp" / ".metadata").write_bytes(b"")
    return weights / "last.dcp"


def test_resume_finds_last_dcp_and_takes_the_newest_checkpoint_of_the_project(tmp_path):
    dcp_last = _dcp_run(tmp_path, "a")
    assert find_last(str(tmp_path), "a") == dcp_last
    pt_last = tmp_path / "b" / "weights" / "last.pt"
    pt_last.parent.mkdir(parents=True)
    pt_last.write_bytes(b"x")
    past = time.time() - 100
    os.utime(dcp_last, (past, past))
    assert find_last(str(tmp_path), None) == pt_last
    os.utime(dcp_last, None)
    assert find_last(str(tmp_path), None) == dcp_last
    with pytest.raises(ResumeError, match="no checkpoint to resume"):
        find_last(str(tmp_path), "missing")


def test_a_fresh_run_never_reuses_a_folder_holding_dcp_checkpoints(tmp_path):
    _dcp_run(tmp_path, "exp")
    cfg = RunConfig(project=str(tmp_path), name="exp")
    assert fresh_run_dir(cfg) == tmp_path / "exp2"


@pytest.mark.parametrize("payload_in", ["metadata", "item"])
def test_a_weaponised_last_dcp_is_refused_before_anything_unpickles_it(tmp_path, payload_in):
    marker = tmp_path / "pwned"
    folder = tmp_path / "run" / "weights" / "last.dcp"
    folder.parent.mkdir(parents=True)
    dcp_folder(folder, payload_in, dumps(system(touch(marker)), 4))
    with pytest.raises(CkptError, match="would run code"):
        load_folder(folder)
    with pytest.raises(ResumeError, match="would run code"):
        load_checkpoint(folder)
    assert not marker.exists()
    # negative control: torch's own DCP loader runs the payload
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dcp_to_torch_save(str(folder), str(tmp_path / "out.pt"))
        except (Exception, CheckpointException):  # the payload's return value breaks the load after it ran
            pass
    assert marker.exists()


def test_a_damaged_last_dcp_falls_back_to_last_prev_dcp(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from fuse_train.launch.resume import trusted_checkpoint

    weights = tmp_path / "weights"
    for name in ("last.dcp", "last.prev.dcp"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(
                {"w": torch.arange(4096.0)}, storage_writer=dcp.FileSystemWriter(str(weights / name)), no_dist=True
            )
    data = weights / "last.dcp" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the tensor's bytes
    data.write_bytes(bytes(raw))
    assert trusted_checkpoint(weights / "last.dcp") == weights / "last.prev.dcp"
    (weights / "last.prev.dcp" / "__0_0.distcp").write_bytes(bytes(raw))
    with pytest.raises(ResumeError, match=r"damaged .*earlier checkpoint"):
        trusted_checkpoint(weights / "last.dcp")


def test_inspect_counts_every_item_of_a_dcp_folder(tmp_path):
    """Storage keys repeat across a DCP folder's items (each is its own small zip, with a storage "0"): the
    parameter count and the bytes must not merge equal-shaped tensors of different items (they did)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from ckpttools.commands.inspect import inspect_checkpoint

    state = {"model": {"a.weight": torch.ones(3, 4), "b.weight": torch.zeros(3, 4), "c.weight": torch.ones(5)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "f")), no_dist=True)
    summary = inspect_checkpoint(tmp_path / "f")
    assert summary["parameter_count"] == 29
    assert summary["bytes_by_dtype"] == {"float32": 29 * 4} and summary["devices"] == {"cpu": 3}


def test_a_failed_dcp_save_is_raised_once_and_publishes_nothing(tmp_path):
    import torch

    from fuse_train.checkpoint.async_save import PinnedSnapshot
    from fuse_train.checkpoint.dcp_save import DcpSaver
    from fuse_train.process.distributed import DistInfo

    weights = tmp_path / "weights"
    weights.write_text("a file where the weights folder should be")  # DCP cannot create its staging folder
    saver = DcpSaver(DistInfo(), PinnedSnapshot(), weights)
    with pytest.raises(OSError, match="DCP save failed"):  # an OSError the trainer reports in one line
        saver.submit({"w": torch.ones(3)}, weights / "last.dcp", [])
        saver.wait()
    saver.wait()  # raised once, not again at the next wait
    assert weights.is_file()

    good = DcpSaver(DistInfo(), PinnedSnapshot(), tmp_path / "ok")
    (tmp_path / "ok").mkdir()
    good.submit({"w": torch.arange(3.0)}, tmp_path / "ok" / "last.dcp", [tmp_path / "ok" / "best.dcp"])
    good.wait()
    assert not good.busy and (tmp_path / "ok" / "last.dcp" / ".metadata").is_file()
    assert (tmp_path / "ok" / "best.dcp" / ".metadata").is_file() and not list((tmp_path / "ok").glob(".*.tmp"))
