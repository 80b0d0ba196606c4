"""``ckpt verify``'s NaN/Inf count (``storage_scan.count_nonfinite``: numpy's isfinite for 32/64-bit floats, an
exponent test for the narrower ones) against torch's own ``isfinite``, on generated bit patterns, for every
floating dtype torch has and our table knows (torch's list, not a hand-written one); and the pass that takes
those counts with each storage's CRC32 and digest leaf, on generated checkpoints."""

from __future__ import annotations

import zlib

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpttools.formats.registry import open_checkpoint
from ckpttools.formats.storage_scan import SCAN_BLOCK, SMALL_RECORD, StorageScanner, count_nonfinite
from ckpttools.tensors import DTYPES

FLOATS = [
    d
    for d in sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
    if (d.is_floating_point or d.is_complex) and str(d).removeprefix("torch.") in DTYPES
]


def _torch_count(raw: bytes, dtype: torch.dtype) -> int:
    if not raw:
        return 0
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
    if dtype == torch.float4_e2m1fn_x2:  # no NaN, no Inf, and no kernel to ask torch with
        return 0
    if t.is_complex():
        t = torch.view_as_real(t.to(torch.complex64) if dtype == torch.complex32 else t)
    return int((~torch.isfinite(t.float() if t.element_size() < 4 else t)).sum())


def test_torch_has_the_floats_we_count():
    assert {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64} <= set(FLOATS)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_the_nonfinite_count_is_torchs_for_any_bits(dtype, data):
    size = torch.empty(0, dtype=dtype).element_size()
    n = data.draw(st.integers(0, 300))
    # bit patterns: random, plus special values planted (all exponent bits set, with and without mantissa)
    raw = bytearray(data.draw(st.binary(min_size=n * size, max_size=n * size)))
    for i in data.draw(st.lists(st.integers(0, max(0, n - 1)), max_size=5)) if n else []:
        raw[i * size : (i + 1) * size] = b"\xff" * size
    assert count_nonfinite(bytes(raw), str(dtype).removeprefix("torch.")) == _torch_count(bytes(raw), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64], ids=str)
def test_finite_values_whose_squares_overflow_are_not_counted(dtype):
    """The quick test of 32/64-bit floats is a block's dot product with itself: finite values past the square
    root of the largest float make it Inf, and only then are the values counted one by one, finding none."""
    big = torch.finfo(torch.float32 if dtype == torch.complex64 else dtype).max / 2
    t = torch.full((1000,), big, dtype=dtype)
    raw = t.numpy().tobytes()
    assert count_nonfinite(raw, str(dtype).removeprefix("torch.")) == 0 == _torch_count(raw, dtype)
    t[500] = float("nan")
    raw = t.numpy().tobytes()
    assert count_nonfinite(raw, str(dtype).removeprefix("torch.")) == 1 == _torch_count(raw, dtype)


# sizes on both sides of the pass's paths: tiny records (one loop for all), and records spanning several L2 blocks
RECORD_ELEMENTS = st.sampled_from([0, 1, 7, 1000, SMALL_RECORD // 4 + 1, (SCAN_BLOCK // 4) * 2 + 3])


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(RECORD_ELEMENTS, min_size=1, max_size=5),
    dtypes=st.lists(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64]), min_size=5),
    planted=st.lists(st.integers(0, 10**6), max_size=4),
)
def test_the_pass_gives_every_storage_its_crc_count_and_leaf_with_or_without_leaves(
    tmp_path_factory, sizes, dtypes, planted
):
    """The one pass over a torch zip (memory-mapped, on threads, small records in one loop) gives each storage
    the CRC32 and NaN/Inf count of its own bytes, and the xxh3 leaf exactly when asked (``leaves``): leaving the
    leaves out changes nothing else."""
    g = torch.Generator().manual_seed(len(sizes))
    tensors = {}
    for i, n in enumerate(sizes):
        t = (torch.randn(n, generator=g) * 100).to(dtypes[i])
        for at in planted if n and t.is_floating_point() else []:
            t[at % n] = float("nan") if at % 2 else float("inf")
        tensors[f"t{i}"] = t
    path = tmp_path_factory.mktemp("scan") / "c.pt"
    torch.save(tensors, path)
    ckpt = open_checkpoint(path)
    for leaves in (True, False):
        scanner = StorageScanner(ckpt, leaves=leaves)
        scanner.scan_all(ckpt.storages.values())
        for name, t in tensors.items():
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            result = scanner.results[id(ckpt.tree[name].storage)]
            assert result.complete and result.bytes_read == len(raw)
            assert result.crc == zlib.crc32(raw)
            assert result.nonfinite == (int((~torch.isfinite(t.float())).sum()) if t.is_floating_point() else 0)
            assert result.xxh3 == (xxhash.xxh3_128_digest(raw) if leaves else None)
