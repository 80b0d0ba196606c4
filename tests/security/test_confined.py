"""Checkpoint folders whose metadata points outside them (issue 25): a DCP `.metadata` that sends items to
another folder (relative `..`, absolute, or through a symlink), a Hugging Face index whose `weight_map` names
a file outside, a shard that is a link out.  torch's own loaders follow such names (shown here as the negative
control); ckpttools reads nothing outside, `verify` reports an error and `convert` refuses."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckpttools.cli import main as ckpt
from ckpttools.commands.verify import verify

ZOO = Path(__file__).resolve().parent.parent.parent / "fixtures" / "zoo"


def _dcp_save(folder: Path, state: dict) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)


def _point_items_at(folder: Path, where: str) -> None:
    """Rewrite ``folder/.metadata`` (our own file: torch's pickle is trusted here) so every item lives at
    ``where``."""
    meta = pickle.loads((folder / ".metadata").read_bytes())
    for info in meta.storage_data.values():
        info.relative_path = where
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


@pytest.fixture
def two_folders(tmp_path):
    mine, other = tmp_path / "mine" / "ckpt", tmp_path / "other"
    _dcp_save(mine, {"w": torch.zeros(64)})
    _dcp_save(other, {"w": torch.full((64,), 7.0)})  # the secret the hostile folder points at
    return mine, other


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_a_dcp_folder_pointing_outside_is_an_error_and_is_never_read(two_folders, tmp_path, how):
    mine, other = two_folders
    target = other / "__0_0.distcp"
    if how == "relative":
        _point_items_at(mine, os.path.relpath(target, mine))
    elif how == "absolute":
        _point_items_at(mine, str(target))
    else:
        (mine / "__0_0.distcp").unlink()
        (mine / "__0_0.distcp").symlink_to(target)

    # negative control: torch's own consolidation follows the name and returns the other folder's tensor
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(mine), str(tmp_path / "torch.pt"))
    assert torch.equal(torch.load(tmp_path / "torch.pt")["w"], torch.full((64,), 7.0))

    report = verify(mine)
    codes = {f.code for f in report.errors}
    assert codes & {"dcp.path-outside", "folder.path-outside"}, codes
    result = CliRunner().invoke(ckpt, ["verify", str(mine), "--json"])
    answer = json.loads(result.output)
    assert result.exit_code == 1 and any("outside the folder" in f["message"] for f in answer["findings"])
    out = tmp_path / "out.pt"
    converted = CliRunner().invoke(ckpt, ["convert", str(mine), str(out)])
    assert converted.exit_code == 1 and not out.exists(), converted.output


def _hf_sharded_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "hf" / "model"
    shutil.copytree(ZOO / "hf_sharded", folder)
    return folder


@pytest.mark.parametrize("shard", ["../canary.safetensors", "/etc/passwd", "sub/../../canary.safetensors"])
def test_an_hf_index_naming_a_file_outside_is_an_error(tmp_path, shard):
    folder = _hf_sharded_copy(tmp_path)
    assert not verify(folder).errors  # the genuine folder is clean
    shutil.copy(next(folder.glob("model-*.safetensors")), folder.parent / "canary.safetensors")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard
    index.write_text(json.dumps(data))
    codes = {f.code for f in verify(folder).errors}
    assert "hf.index-path-outside" in codes
    out = tmp_path / "out.safetensors"
    converted = CliRunner().invoke(ckpt, ["convert", str(folder), str(out)])
    assert converted.exit_code == 1 and not out.exists(), converted.output


def test_a_shard_that_is_a_link_outside_is_not_read(tmp_path):
    folder = _hf_sharded_copy(tmp_path)
    shard = next(folder.glob("model-*.safetensors"))
    moved = tmp_path / "elsewhere.safetensors"
    shard.rename(moved)
    shard.symlink_to(moved)
    codes = {f.code for f in verify(folder).errors}
    assert "folder.path-outside" in codes
    result = CliRunner().invoke(ckpt, ["inspect", str(folder)])
    assert result.exit_code != 0 and "outside the folder" in result.output


def test_a_link_inside_the_folder_is_fine(tmp_path):
    folder = _hf_sharded_copy(tmp_path)
    shard = next(folder.glob("model-*.safetensors"))
    (folder / "real").mkdir()
    moved = folder / "real" / shard.name
    shard.rename(moved)
    shard.symlink_to(moved)
    assert not verify(folder).errors
