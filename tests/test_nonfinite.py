"""``ckpt verify``'s NaN/Inf count (``storage_scan.count_nonfinite``: numpy's isfinite for 32/64-bit floats, an
exponent test for the narrower ones) against torch's own ``isfinite``, on generated bit patterns, for every
floating dtype torch has and our table knows (torch's list, not a hand-written one)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpttools.formats.storage_scan import count_nonfinite
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
