"""The GIL-free writer of torch.save files from live tensors (``ckpttools.formats.live_torch``, fuse-train's saves,
issue 29): for every dtype torch saves (torch's own list) and for generated trees (nested containers, shared
containers and storages, views, parameters, ``requires_grad``), ``torch.load(weights_only=True)`` reads back
what it reads from ``torch.save``'s file of the same tree -- values, dtypes, strides, storage sharing, container
types.  What the writer leaves to torch.save (modules, numpy arrays, subclasses, quantized / sparse tensors) is
declined with nothing written."""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpttools.formats import live_torch
from tests.test_every_dtype import NAMES, SAVEABLE, sample


def _both(tree):
    ours, theirs = io.BytesIO(), io.BytesIO()
    assert live_torch.save(tree, ours)
    torch.save(tree, theirs)
    load = lambda b: torch.load(io.BytesIO(b.getvalue()), weights_only=True)  # noqa: E731
    return load(ours), load(theirs)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as bytes (NaN-safe, every dtype)."""
    if not t.numel():
        return torch.empty(0, dtype=torch.uint8)
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t)  # row-major strides, size-1 dimensions included
    return dense.reshape(-1).view(torch.uint8)


def _same(a, b, storages_a: dict, storages_b: dict) -> bool:
    """Equal as torch.load gives them, storage sharing included (two tensors share in one iff in the other)."""
    if isinstance(a, torch.Tensor):
        same_sharing = (
            storages_a.setdefault(a.untyped_storage().data_ptr(), id(b))
            == storages_b.setdefault(b.untyped_storage().data_ptr(), id(b))
            or a.numel() == 0
        )
        return (
            type(a) is type(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset()
            and a.requires_grad == b.requires_grad
            and torch.equal(_bytes(a), _bytes(b))
            and same_sharing
        )
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k], storages_a, storages_b) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            type(a) is type(b) and len(a) == len(b) and all(_same(x, y, storages_a, storages_b) for x, y in zip(a, b))
        )
    return type(a) is type(b) and (a == b or a != a)


@pytest.mark.parametrize("dtype", SAVEABLE, ids=NAMES)
def test_every_dtype_torch_saves_is_written_as_torch_writes_it(dtype):
    t = sample(dtype)
    ours, theirs = _both({"t": t, "view": t[1:5], "scalar": t[0].clone()})
    assert _same(ours, theirs, {}, {})


TENSORS = st.builds(
    lambda dtype, n, step, grad: (
        (torch.arange(n, dtype=torch.float32) * 1.5).to(dtype)[::step].requires_grad_(grad)
        if grad
        else (torch.arange(n, dtype=torch.float32) * 1.5).to(dtype)[::step]
    ),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]),
    st.integers(0, 12),
    st.integers(1, 3),
    st.just(False),
)
PARAMS = st.builds(lambda n: torch.nn.Parameter(torch.randn(n)), st.integers(1, 5))
LEAVES = st.one_of(TENSORS, PARAMS, st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=3), st.none())
TREES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=3), inner, max_size=4),
        st.dictionaries(st.integers(0, 9), inner, max_size=3).map(collections.OrderedDict),
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=TREES, share=st.booleans())
def test_generated_trees_read_back_as_torch_saves_them(tree, share):
    base = torch.arange(24, dtype=torch.float32)
    tree = {"tree": tree, "base": base, "views": [base[3:9].view(2, 3), base.view(4, 6).t()]}
    if share:  # a container that appears twice, and a tensor under two names
        tree["again"] = tree["views"]
        tree["alias"] = base
    ours, theirs = _both(tree)
    assert _same(ours, theirs, {}, {})
    if share:
        assert ours["again"] is ours["views"] and ours["alias"].untyped_storage().data_ptr() == (
            ours["base"].untyped_storage().data_ptr()
        )


@pytest.mark.parametrize(
    "value",
    [
        np.zeros(3),
        torch.nn.Linear(2, 2),
        torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8),
        torch.ones(2, 2).to_sparse(),
        torch.ones(3, dtype=torch.complex64).conj(),
    ],
    ids=["numpy", "module", "quantized", "sparse", "conj"],
)
def test_what_only_torch_save_writes_is_declined_with_nothing_written(value):
    out = io.BytesIO()
    assert not live_torch.save({"x": value}, out)
    assert out.getvalue() == b""


def test_one_storage_viewed_as_two_dtypes_is_left_to_torch_save():
    floats = torch.zeros(4)
    ints = torch.empty(0, dtype=torch.int32).set_(floats.untyped_storage(), 0, (4,), (1,))
    out = io.BytesIO()
    assert not live_torch.save({"f": floats, "i": ints}, out) and out.getvalue() == b""
