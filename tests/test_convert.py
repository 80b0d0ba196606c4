"""`ckpt convert` (issue 7): round trips between every format pair, bitwise; bf16 through HDF5; legacy -> zip;
--dtype / --weights-only / --ema; other trainers' checkpoints; inputs never modified."""

import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckpttools.cli import main as ckpt
from ckpttools.commands.convert import convert
from ckpttools.commands.diff import diff_checkpoints
from ckpttools.commands.verify import verify
from tests.helpers import load, tensors_equal


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _training_like(path):
    """A checkpoint with everything a training checkpoint holds: nested dicts, int keys, tuples, None, numpy
    RNG state, bf16 and fp16 tensors, a strided view, a 0-d and an empty tensor, a Parameter."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 4))
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    big = torch.randn(6, 5)
    tree = {
        "model": net.state_dict(),
        "ema": {k: v.clone() + 1 for k, v in net.state_dict().items()},
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "best_fitness": None,
        "lr": (0.01, 0.9),
        "names": {0: "person", 1: "car"},
        "bf16": torch.randn(7, 3).bfloat16(),
        "fp16": torch.randn(4).half(),
        "view": big.t(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "huge_int": 2**70,
        "nan": float("nan"),
        "param": torch.nn.Parameter(torch.ones(3)),
        "rng": {"python": __import__("random").getstate(), "numpy": np.random.RandomState(1).get_state()},
    }
    torch.save(tree, path)
    return tree


def _assert_same(a, b):
    assert tensors_equal(a, b) == []


@pytest.mark.parametrize("middle", ["h5", "dcp"])
def test_pt_through_a_format_and_back_is_bitwise_identical(tmp_path, middle):
    src = tmp_path / "src.pt"
    original = _training_like(src)
    before = _sha(src)
    mid = tmp_path / ("mid.h5" if middle == "h5" else "mid_dcp")
    convert(src, mid)
    back = tmp_path / "back.pt"
    convert(mid, back)
    assert _sha(src) == before  # inputs are never modified
    if middle == "h5":
        assert diff_checkpoints(src, back).verdict == "identical"
        assert diff_checkpoints(src, mid).verdict == "identical"
    got = torch.load(back, weights_only=False)
    if middle == "dcp":  # torch's DCP flattening turns non-string keys into strings (documented, and noted)
        original["optimizer"]["state"] = {str(k): v for k, v in original["optimizer"]["state"].items()}
        original["names"] = {str(k): v for k, v in original["names"].items()}
    for key in ("model", "ema", "optimizer", "bf16", "fp16", "view", "scalar", "empty"):
        _assert_same(original[key], got[key])
    assert got["bf16"].dtype == torch.bfloat16
    assert got["optimizer"]["state"].keys() == original["optimizer"]["state"].keys()  # HDF5: int keys survive
    assert got["lr"] == (0.01, 0.9) and got["names"] == original["names"] and got["huge_int"] == 2**70
    assert got["rng"]["python"] == original["rng"]["python"]
    assert np.array_equal(got["rng"]["numpy"][1], original["rng"]["numpy"][1])
    assert not verify(back).errors


def test_hdf5_layout_chunked_with_fletcher32_and_bf16_kept(tmp_path):
    import h5py

    src = tmp_path / "src.pt"
    _training_like(src)
    convert(src, tmp_path / "c.h5", compress=True)
    with h5py.File(tmp_path / "c.h5") as f:
        ds = f["bf16"]
        assert ds.attrs["dtype"] == "bfloat16" and ds.dtype == np.uint16
        assert ds.fletcher32 and ds.chunks is not None and ds.compression == "gzip"
        assert f["model"]["0.weight"].shape == (4, 3, 3, 3)
        assert f.attrs["epoch"] == 3
    raw = torch.load(src, weights_only=False)["bf16"]
    with h5py.File(tmp_path / "c.h5") as f:
        assert torch.equal(torch.from_numpy(f["bf16"][()].astype(np.int32)).to(torch.int16).view(torch.bfloat16), raw)


def test_hdf5_damage_is_caught_by_fletcher32(tmp_path):
    src = tmp_path / "src.pt"
    torch.save({"w": torch.randn(256, 256)}, src)
    convert(src, tmp_path / "c.h5")
    data = bytearray((tmp_path / "c.h5").read_bytes())
    raw = torch.load(src)["w"].numpy().tobytes()
    at = bytes(data).find(raw[4096:4160])
    assert at > 0
    data[at + 10] ^= 0xFF
    (tmp_path / "bad.h5").write_bytes(bytes(data))
    assert verify(tmp_path / "bad.h5").errors


@pytest.mark.slow  # uses the session's reference training run
def test_safetensors_loads_with_the_library_and_keeps_metadata(tmp_path, reference_run):
    from safetensors import safe_open
    from safetensors.torch import load_file

    last = reference_run[0] / "weights" / "last.pt"
    out = tmp_path / "m.safetensors"
    result = convert(last, out, ema=True)
    tensors = load_file(out)
    ema = load(last)["ema"]
    assert tensors.keys() == ema.keys()
    assert all(torch.equal(tensors[k], ema[k]) for k in ema)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["train_args"])["batch"] == 4 and meta["source_layout"] == "fuse-train"
    assert any("not carried" in n and "optimizer" in n for n in result.notes)
    back = tmp_path / "back.pt"
    convert(out, back)
    assert tensors_equal(dict(torch.load(back, weights_only=True)), ema) == []


@pytest.mark.slow  # uses the session's reference training run
def test_weights_only_and_dtype_for_deployment(tmp_path, reference_run):
    last = reference_run[0] / "weights" / "last.pt"
    out = tmp_path / "fp16.pt"
    result = convert(last, out, weights_only=True, ema=True, dtype="fp16")
    sd = torch.load(out, weights_only=True)
    ema = load(last)["ema"]
    assert sd.keys() == ema.keys()
    for k, v in ema.items():
        assert sd[k].dtype == (torch.float16 if v.is_floating_point() else v.dtype)
        assert torch.equal(sd[k], v.half() if v.is_floating_point() else v)
    assert any("cast to float16" in n for n in result.notes)
    assert out.stat().st_size < last.stat().st_size / 3


@pytest.mark.slow  # uses the session's reference training run
def test_dtype_cast_of_a_full_checkpoint_rebuilds_its_digest(tmp_path, reference_run):
    out = tmp_path / "bf16.pt"
    convert(reference_run[0] / "weights" / "last.pt", out, dtype="bf16")
    model = load(out)["model"]
    assert {v.dtype for v in model.values() if v.is_floating_point()} == {torch.bfloat16}
    assert not verify(out).errors  # the digest matches the cast content


def test_legacy_torch_file_to_zip(tmp_path):
    legacy = tmp_path / "legacy.pt"
    tree = {"w": torch.randn(3, 4), "step": 7, "nested": {"b": torch.arange(5)}}
    torch.save(tree, legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    out = tmp_path / "new.pt"
    result = convert(legacy, out)
    assert zipfile.is_zipfile(out) and any("legacy" in n for n in result.notes)
    _assert_same(tree, torch.load(out, weights_only=True))


class DetectionModel(torch.nn.Module):  # stands in for ultralytics.nn.tasks.DetectionModel
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)


def test_ultralytics_checkpoint_without_ultralytics(tmp_path):
    """A pickled model object is read without importing its class; HDF5 stores its state dict and says so;
    a .pt output keeps the object (written back by reference, nothing imported)."""
    model = DetectionModel()
    src = tmp_path / "yolo.pt"
    torch.save({"epoch": 5, "model": None, "ema": model, "train_args": {"batch": 16}, "date": "x"}, src)
    result = convert(src, tmp_path / "y.h5")
    assert any("DetectionModel stored as its state dict" in n for n in result.notes)
    back = tmp_path / "y.pt"
    convert(tmp_path / "y.h5", back)
    sd = torch.load(back, weights_only=True)["ema"]
    assert torch.equal(sd["conv.weight"], model.conv.weight.detach())
    again = tmp_path / "again.pt"
    convert(src, again)  # pt -> pt keeps the pickled object, loadable where the class exists
    reloaded = torch.load(again, weights_only=False)["ema"]
    assert isinstance(reloaded, DetectionModel) and torch.equal(reloaded.conv.weight, model.conv.weight)


def test_cli_convert_errors_are_one_line(tmp_path):
    src = tmp_path / "a.pt"
    torch.save({"w": torch.ones(2)}, src)
    runner = CliRunner()
    ok = runner.invoke(ckpt, ["convert", str(src), str(tmp_path / "a.h5"), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["tensors"] == 1
    for args, needle in (
        (["convert", str(src), str(tmp_path / "a.h5")], "already exists"),
        (["convert", str(src), str(src), "--force"], "is the input"),
        (["convert", str(tmp_path / "none.pt"), str(tmp_path / "x.h5")], "no such file"),
        (["convert", str(src), str(tmp_path / "x.weird")], "cannot tell the format"),
        (["convert", str(src), str(tmp_path / "e.pt"), "--ema"], "--ema"),
        (["convert", str(src), str(tmp_path / "w.h5"), "--world-size", "2"], "--world-size"),
        (["convert", str(src), str(tmp_path / "w"), "--to", "dcp", "--world-size", "0"], "--world-size"),
    ):
        res = runner.invoke(ckpt, args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output and "Traceback" not in res.output
    torn = tmp_path / "torn.pt"
    torn.write_bytes(src.read_bytes()[:-60])
    res = runner.invoke(ckpt, ["convert", str(torn), str(tmp_path / "t.h5")])
    assert res.exit_code == 1 and "ckpt repair" in res.output  # a damaged input: exit 1, not a usage error


@pytest.mark.slow
def test_dcp_written_for_a_world_size_and_consolidated_back(reference_run, tmp_path):
    """`--world-size 2`: two gloo processes write DTensor shards through dcp.save; torch's dcp_to_torch_save
    brings back every tensor bitwise."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    last = reference_run[0] / "weights" / "last.pt"
    folder = tmp_path / "sharded"
    result = convert(last, folder, to="dcp", world_size=2)
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert any("empty dicts" in n for n in result.notes)
    dcp_to_torch_save(str(folder), str(tmp_path / "torch_own.pt"))
    ours = tmp_path / "ours.pt"
    convert(folder, ours)
    for got in (load(ours), load(tmp_path / "torch_own.pt")):
        original = load(last)
        original["optimizer"]["state"] = {str(k): v for k, v in original["optimizer"]["state"].items()}
        for key in ("model", "ema", "optimizer", "progress", "rng"):
            _assert_same(original[key], got[key])
    report = diff_checkpoints(last, ours)
    assert not report.changed and not report.only_in_a and not report.only_in_b
