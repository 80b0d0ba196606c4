"""The content digest (``ckpttools.digest``).

* Digests recorded by an earlier version (fixtures/digest, made by fixtures/make_digest_fixture.py) still verify,
  from the safe reader's lazy tensors (``ckpt verify``) and from the tensors ``torch.load`` gives (what a trainer
  recomputes), for both algorithms: any change to how the walk computes the digest is checked against values it
  did not write itself.
* On generated trees of every value kind ``torch.save`` writes and ``weights_only`` loads (torch's named
  constants too): the digest from torch's values is the one from the safe reader's values, so a file a trainer
  digested is never called changed by ``ckpt verify``; and changing a value changes it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpttools.commands.verify import verify
from ckpttools.digest import DIGEST_KEY, DIGEST_V1, DIGEST_V2, lazy_digest, tree_digest
from ckpttools.formats.registry import open_checkpoint
from ckpttools.tensors import TensorSource

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "digest"


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_a_digest_recorded_earlier_verifies(name):
    path = FIXTURES / f"{name}.pt"
    report = verify(path)
    assert not [f for f in report.findings if f.code.startswith("digest.")], report.findings
    loaded = torch.load(path, weights_only=True)
    record = loaded[DIGEST_KEY]
    assert report.facts["digest"] == record["value"]
    assert tree_digest(loaded, algorithm=record["algorithm"]) == record["value"]


def test_a_changed_value_changes_the_digest():
    recorded = torch.load(FIXTURES / "v2.pt", weights_only=True)[DIGEST_KEY]["value"]
    for change in (
        lambda t: t["values"].__setitem__(7, 0.0),  # -0.0 -> 0.0
        lambda t: t["mixed_keys"].__setitem__(1, "One"),
        lambda t: t["transposed"].__setitem__((0, 0), 1.0),
        lambda t: t["mask"].__setitem__(1, True),
        lambda t: t["optimizer"]["param_groups"][0].__setitem__("lr", 1e-3 + 1e-12),
    ):
        tree = torch.load(FIXTURES / "v2.pt", weights_only=True)
        change(tree)
        assert tree_digest(tree) != recorded


# ---- the same digest from torch's values and from the safe reader's ------------------------------------------

DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)  # torch's own list
CONSTANTS = [
    *DTYPES,
    torch.strided,
    torch.sparse_coo,
    torch.per_tensor_affine,
    torch.device("cpu"),
    torch.device("cuda", 1),
]
plain = (
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.sampled_from(CONSTANTS)
)
tensors = st.builds(
    lambda shape, dtype, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 50).to(dtype),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool]),
    st.integers(0, 9),
)
keys = st.text(max_size=4) | st.integers(-3, 3)
trees = st.recursive(
    plain | tensors,
    lambda kids: (
        st.lists(kids, max_size=3) | st.lists(kids, max_size=3).map(tuple) | st.dictionaries(keys, kids, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(st.text(max_size=5), trees, min_size=1, max_size=4), v1=st.booleans())
def test_torchs_values_and_the_readers_give_the_same_digest(tmp_path, tree, v1):
    algorithm = DIGEST_V1 if v1 else DIGEST_V2
    path = tmp_path / "t.pt"
    torch.save(tree, path)
    loaded = torch.load(path, weights_only=True)
    ckpt = open_checkpoint(path)
    assert lazy_digest(ckpt.tree, TensorSource(ckpt), algorithm) == tree_digest(loaded, algorithm=algorithm)
    # recorded by a writer from torch's values, ckpt verify finds the file unchanged
    loaded[DIGEST_KEY] = {"algorithm": algorithm, "value": tree_digest(loaded, algorithm=algorithm)}
    torch.save(loaded, path)
    assert not [f for f in verify(path).findings if f.code.startswith("digest.")]


def test_the_floats_that_compare_equal_are_still_told_apart():
    # 0.0 and -0.0 compare equal, NaN does not equal itself: the digest hashes the bits
    assert tree_digest({"x": 0.0}) != tree_digest({"x": -0.0})
    assert tree_digest({"x": math.nan}) == tree_digest({"x": math.nan})
