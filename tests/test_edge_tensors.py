"""Quantized, sparse, nested and meta tensors (issue 25), each saved by torch's own ``torch.save`` and loaded back
by ``torch.load(weights_only=True)`` in the test itself: verify passes, inspect shows them, diff of a file with
itself is identical, the .pt writers (convert, remap) give back equal tensors, and every other format declines
with exit 2 naming them."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ckpttools.commands.convert import convert
from ckpttools.commands.remap import remap
from ckpttools.commands.verify import verify
from ckpttools.errors import FormatLimit

warnings.filterwarnings("ignore", category=UserWarning)


def _dynamic_quantized() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8).state_dict()


def _examples() -> dict:
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(4, 6, generator=g).masked_fill(torch.rand(4, 6, generator=g) < 0.5, 0)
    return {
        "quantized_per_tensor": torch.quantize_per_tensor(torch.randn(5, generator=g), 0.1, 3, torch.qint8),
        "quantized_per_channel": torch.quantize_per_channel(
            torch.randn(2, 3, generator=g), torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), 0, torch.quint8
        ),
        "sparse_coo": dense.to_sparse(),
        "sparse_csr": dense.to_sparse_csr(),
        "sparse_csc": dense.to_sparse_csc(),
        "sparse_bsr": dense.to_sparse_bsr((2, 2)),
        "nested": torch.nested.nested_tensor([torch.randn(2, generator=g), torch.randn(3, generator=g)]),
        "meta": torch.empty(3, 4, device="meta"),
        "dynamic_quantized_linear": _dynamic_quantized(),
    }


KINDS = list(_examples())


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return list(a) == list(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if not isinstance(a, torch.Tensor):
        return a == b
    if not isinstance(b, torch.Tensor) or (a.dtype, a.layout, a.device.type) != (b.dtype, b.layout, b.device.type):
        return False
    if a.is_nested:
        return all(equal(x, y) for x, y in zip(a.unbind(), b.unbind(), strict=True))
    if a.device.type == "meta":
        return a.shape == b.shape and a.stride() == b.stride()
    if a.is_quantized:
        return (
            a.qscheme() == b.qscheme()
            and torch.equal(a.int_repr(), b.int_repr())
            and torch.equal(a.dequantize(), b.dequantize())
        )
    if a.layout != torch.strided:
        return torch.equal(a.to_dense(), b.to_dense())
    return torch.equal(a, b)


@pytest.fixture(scope="module")
def edge_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("edge")
    files = {}
    for kind, value in _examples().items():
        path = folder / f"{kind}.pt"
        torch.save({"w": value, "step": 3}, path)
        assert equal(torch.load(path, weights_only=True)["w"], value)  # torch's weights-only loader takes it
        files[kind] = path
    return files


def _ckpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpttools.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", KINDS)
def test_verify_inspect_and_diff_take_it(edge_files, kind):
    path = edge_files[kind]
    report = verify(path)
    assert not report.errors and not [f for f in report.warnings if f.code.startswith("safety")], [
        (f.code, f.message) for f in report.findings
    ]
    shown = _ckpt("inspect", str(path))
    assert shown.returncode == 0 and "not imported" not in shown.stdout, shown.stdout + shown.stderr
    word = "quantized" if "quantized" in kind else kind.split("_")[0]
    assert word in shown.stdout or kind == "dynamic_quantized_linear"
    same = _ckpt("diff", str(path), str(path))
    assert same.returncode == 0, same.stdout[-1500:]


@pytest.mark.parametrize("kind", KINDS)
def test_pt_writers_give_back_equal_tensors(edge_files, tmp_path, kind):
    path = edge_files[kind]
    original = torch.load(path, weights_only=True)
    convert(path, tmp_path / "converted.pt")
    remap(path, tmp_path / "remapped.pt", device="cpu")
    for out in ("converted.pt", "remapped.pt"):
        assert equal(torch.load(tmp_path / out, weights_only=True), original), out
        assert not verify(tmp_path / out).errors


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["out.h5", "out.safetensors", "out_dcp"])
def test_other_formats_decline_by_name(edge_files, tmp_path, kind, target):
    with pytest.raises(FormatLimit) as refused:
        convert(edge_files[kind], tmp_path / target)
    assert refused.value.exit_code == 2 and any("w" in p for p in refused.value.paths)
    assert not (tmp_path / target).exists()


def test_a_changed_quantizer_scale_is_a_difference(tmp_path):
    data = torch.randn(5)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.quantize_per_tensor(data, 0.1, 3, torch.qint8)}, a)
    torch.save({"w": torch.quantize_per_tensor(data * 2, 0.2, 3, torch.qint8)}, b)  # same integers, new scale
    assert torch.equal(torch.load(a)["w"].int_repr(), torch.load(b)["w"].int_repr())
    result = _ckpt("diff", str(a), str(b))
    assert result.returncode == 1 and "scale=0.2" in result.stdout.replace("\n", " "), result.stdout
