"""Each writable format, round trip: written by its module, read back by the same module: bitwise equal
tensors and the same content digest."""

from __future__ import annotations

import pytest
import torch

from ckpttools.atomic import atomic_path, atomic_write
from ckpttools.digest import lazy_digest
from ckpttools.formats import dcp, hdf5, safetensors, torchzip
from ckpttools.formats.registry import open_checkpoint
from ckpttools.tensors import TensorSource
from ckpttools.trees import iter_tensors, materialise


def _source_checkpoint(tmp_path):
    tree = {
        "model": {"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16), "n": torch.tensor(5)},
        "opt": {"state": {"0": {"exp_avg": torch.randn(4, 3)}}, "lr": 0.01},
        "epoch": 2,
        "names": ["a", "b"],
    }
    path = tmp_path / "src.pt"
    torch.save(tree, path)
    return open_checkpoint(path)


def _write(fmt: str, ckpt, out):
    source = TensorSource(ckpt)
    if fmt == "torchzip":
        torchzip.write_file(ckpt.tree, out, source)
    elif fmt == "hdf5":
        with atomic_path(out) as tmp:
            hdf5.write_hdf5(ckpt.tree, tmp, source.tensor_chunks)
    elif fmt == "safetensors":
        with atomic_write(out) as f:
            safetensors.write_safetensors(ckpt.tree["model"], f, source.tensor_chunks, {"epoch": "2"})
    elif fmt == "dcp":
        out.mkdir()
        dcp.write_single(materialise(ckpt.tree), out)


@pytest.mark.parametrize(
    "fmt,name", [("torchzip", "out.pt"), ("hdf5", "out.h5"), ("safetensors", "out.safetensors"), ("dcp", "out_dcp")]
)
def test_write_then_read_is_bitwise_equal_with_the_same_digest(tmp_path, fmt, name):
    ckpt = _source_checkpoint(tmp_path)
    out = tmp_path / name
    _write(fmt, ckpt, out)
    back = open_checkpoint(out)
    assert back.format == {"torchzip": "torch-zip"}.get(fmt, fmt)
    assert not [f for f in back.findings if f.severity == "error"]
    original = ckpt.tree["model"] if fmt == "safetensors" else ckpt.tree
    mine, theirs = dict(iter_tensors(original)), dict(iter_tensors(back.tree))
    if fmt == "dcp":  # DCP flattens the tree and keeps dict keys as strings: compare by the flattened name
        theirs = {k.replace(".", "/"): v for k, v in dict(iter_tensors(back.tree)).items()}
    assert mine.keys() == theirs.keys()
    src, dst = TensorSource(ckpt), TensorSource(back)
    for key, t in mine.items():
        assert (t.dtype, t.shape) == (theirs[key].dtype, theirs[key].shape), key
        assert b"".join(src.tensor_chunks(t)) == b"".join(dst.tensor_chunks(theirs[key])), key
    if fmt in ("torchzip", "hdf5", "safetensors"):  # the container-independent digest survives the round trip
        assert lazy_digest(original, src) == lazy_digest(back.tree, dst)
