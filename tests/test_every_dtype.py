"""Every dtype torch saves is read and written exactly, or refused (issue 25).

The dtypes come from torch itself (every ``torch.dtype`` attribute that ``torch.save`` / ``torch.load`` take),
never from a list written here, so a dtype added by a new torch release is tested the day it appears.  For
each writer the rule is the same: the output, read back by torch, holds the same dtype and the same bytes;
or the conversion exits 2 naming the tensors, and then the target truly cannot hold them (checked against
safetensors' and torch's own writers, not against our table).
"""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpttools.commands.convert import convert
from ckpttools.commands.remap import remap
from ckpttools.commands.verify import verify
from ckpttools.errors import FormatLimit

warnings.filterwarnings("ignore", message=".*ComplexHalf.*")


def _saveable(dtype: torch.dtype) -> bool:
    try:
        buf = io.BytesIO()
        torch.save(torch.empty(2, dtype=dtype), buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - torch itself cannot save this dtype: nothing of ours to test
        return False


TORCH_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
SAVEABLE = [d for d in TORCH_DTYPES if _saveable(d)]
NAMES = [str(d).removeprefix("torch.") for d in SAVEABLE]


def test_torch_has_dtypes_to_test():
    # a guard that the discovery above found torch's table, so the parametrised tests cannot pass empty
    assert len(SAVEABLE) >= 20 and torch.float32 in SAVEABLE and torch.uint8 in SAVEABLE


def sample(dtype: torch.dtype, n: int = 6) -> torch.Tensor:
    """Finite, distinct values where the dtype has numbers; byte patterns 1..n otherwise."""
    if dtype == torch.bool:
        return torch.tensor([True, False] * (n // 2))
    try:
        t = torch.arange(1, n + 1, dtype=torch.float32).to(dtype)
        if torch.equal(t.view(torch.uint8), t.view(torch.uint8)):  # view works for the dtype
            return t
    except (RuntimeError, TypeError):
        pass
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.arange(1, n * size + 1, dtype=torch.uint8).view(dtype)


def element_bytes(x: torch.Tensor) -> torch.Tensor:
    """Each element's bytes, shape (*x.shape, itemsize), read through x's strides from its storage (torch's
    ``view(uint8)`` refuses strided complex views and some dtypes have no copy kernel)."""
    size = x.element_size()
    raw = torch.empty(0, dtype=torch.uint8).set_(x.untyped_storage())
    return raw.as_strided((*x.shape, size), (*(s * size for s in x.stride()), 1), x.storage_offset() * size)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(element_bytes(a), element_bytes(b))


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    values = {name: sample(d) for name, d in zip(NAMES, SAVEABLE)}
    path = tmp_path_factory.mktemp("dtypes") / "dtypes.pt"
    torch.save(values, path)
    return path, values


def _ckpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpttools.cli", *args], capture_output=True, text=True, timeout=120)


def test_verify_inspect_and_diff_take_every_dtype(every_dtype):
    path, values = every_dtype
    report = verify(path)
    assert not report.errors and not report.warnings, [f.message for f in report.findings]
    shown = _ckpt("inspect", str(path))
    assert shown.returncode == 0 and "placeholder" not in shown.stdout, shown.stdout[-2000:]
    for name in values:
        assert f"{name}: tensor {name} [6]" in shown.stdout.replace("\n", " ").replace("│", "")
    assert _ckpt("diff", str(path), str(path)).returncode == 0


@pytest.mark.parametrize("name", NAMES)
def test_torch_zip_and_remap_write_every_dtype_exactly(tmp_path, name):
    src = tmp_path / "one.pt"
    value = sample(getattr(torch, name))
    torch.save({"x": value, "view": value[1::2]}, src)
    convert(src, tmp_path / "out.pt")
    remap(src, tmp_path / "remapped.pt", device="cpu")
    for out in ("out.pt", "remapped.pt"):
        back = torch.load(tmp_path / out, weights_only=True)
        assert same(back["x"], value) and same(back["view"], value[1::2]), out


@pytest.mark.parametrize("name", NAMES)
def test_hdf5_round_trip_is_exact_for_every_dtype(tmp_path, name):
    src = tmp_path / "one.pt"
    value = sample(getattr(torch, name))
    torch.save({"x": value}, src)
    convert(src, tmp_path / "mid.h5")
    convert(tmp_path / "mid.h5", tmp_path / "back.pt")
    assert same(torch.load(tmp_path / "back.pt", weights_only=True)["x"], value)


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_is_exact_or_refused(tmp_path, name):
    from safetensors.torch import load_file, save_file

    src, out = tmp_path / "one.pt", tmp_path / "out.safetensors"
    value = sample(getattr(torch, name))
    torch.save({"x": value}, src)
    try:
        convert(src, out)
    except FormatLimit as exc:
        assert "x" in str(exc) and name in str(exc) and not out.exists()
        # the refusal is real: safetensors' own torch API cannot write and read this dtype back either
        with pytest.raises(Exception):  # noqa: B017 (a write error or values that differ: either refutes)
            save_file({"x": value}, tmp_path / "theirs.safetensors")
            assert same(load_file(tmp_path / "theirs.safetensors")["x"], value)
        return
    assert same(load_file(out)["x"], value)  # read by safetensors itself, not by us


def test_dcp_is_exact_or_refused_for_every_dtype(tmp_path, every_dtype):
    import torch.distributed.checkpoint as dcp

    path, values = every_dtype
    try:
        convert(path, tmp_path / "all_dcp")
        refused: list[str] = []
    except FormatLimit as exc:
        refused = exc.paths
        assert refused and set(refused) <= set(values) and not (tmp_path / "all_dcp").exists()
    for name in refused:  # torch's own DCP writer fails on each of them too (CheckpointException is a
        with pytest.raises((Exception, dcp.api.CheckpointException)):  # BaseException)
            dcp.save({"x": values[name]}, checkpoint_id=str(tmp_path / f"theirs_{name}"), no_dist=True)
    kept = {n: v for n, v in values.items() if n not in refused}
    torch.save(kept, tmp_path / "kept.pt")
    convert(tmp_path / "kept.pt", tmp_path / "dcp")
    convert(tmp_path / "dcp", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert sorted(back) == sorted(kept) and all(same(back[n], kept[n]) for n in kept)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(SAVEABLE),
    data=st.binary(min_size=32, max_size=96),
    step=st.integers(1, 3),
    offset=st.integers(0, 3),
)
def test_any_bytes_any_view_round_trip_through_pt_and_hdf5(tmp_path_factory, dtype, data, step, offset):
    """Arbitrary bit patterns (NaNs, subnormals, any byte) in strided views: kept bit for bit."""
    folder = tmp_path_factory.mktemp("bits")
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.frombuffer(bytearray(data[: len(data) // size * size]), dtype=torch.uint8)
    base = raw.view(dtype) if dtype != torch.bool else raw % 2 == 1
    view = base[offset::step]
    torch.save({"base": base, "view": view}, folder / "in.pt")
    convert(folder / "in.pt", folder / "out.pt")
    convert(folder / "in.pt", folder / "mid.h5")
    convert(folder / "mid.h5", folder / "back.pt")
    for out in ("out.pt", "back.pt"):
        back = torch.load(folder / out, weights_only=True)
        assert same(back["base"], base) and same(back["view"], view), out


def test_a_dtype_newer_than_our_table_is_named_never_guessed(tmp_path):
    """A torch release may add a dtype: its tensors are an error naming it, and no writer guesses a size."""
    import zipfile

    buf = io.BytesIO()
    torch.save({"x": torch.zeros(2, dtype=torch.bits16)}, buf)
    src = tmp_path / "future.pt"
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(src, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"torch\nbits16\n" in data
                data = data.replace(b"torch\nbits16\n", b"torch\nbitsXX\n")  # a name torch may add one day
            zout.writestr(info, data)
    report = verify(src)
    assert [f.code for f in report.errors] == ["tensor.unknown-dtype"] and "torch.bitsXX" in report.errors[0].message
    from ckpttools.commands.repair import repair

    for write in (
        lambda out: remap(src, out, device="cpu"),
        lambda out: convert(src, out),
        lambda out: repair(src, out),
    ):
        with pytest.raises(FormatLimit, match="bitsXX"):  # exit 2: a limit of this version, never "damaged"
            write(tmp_path / "out.pt")
        assert not (tmp_path / "out.pt").exists()
