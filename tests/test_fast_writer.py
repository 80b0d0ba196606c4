"""The torch-zip writer's fast path (the C pickler, for trees of plain data and tensors) writes what the
name-writing pickler writes: generated trees -- nested containers, shared storages, views, parameters, every
dtype of our table -- read back identically by our reader and by torch; trees that hold names only the slow
pickler can write (placeholders, dtypes as values, rebuilt tensors) fall back to it."""

from __future__ import annotations

import collections
import io

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpttools.formats import torch_pickler, torchzip
from ckpttools.objects import Reference, placeholder_class
from ckpttools.pickle.unpickler import restricted_load
from ckpttools.tensors import DTYPES, DType, LazyTensor, StorageRef, contiguous_strides


def _slow(tree) -> bytes:
    keys: dict[int, str] = {}
    storages: list = []

    def key(ref):
        if id(ref) not in keys:
            keys[id(ref)] = str(len(storages))
            storages.append(ref)
        return keys[id(ref)]

    buf = io.BytesIO()
    torch_pickler.TreePickler(buf, key, lambda ref: ref.location).dump(tree)
    return buf.getvalue()


def _describe(value, pids: dict) -> object:
    """A comparable description of a tree read back by our reader (tensors by their storage's persistent id)."""
    if isinstance(value, LazyTensor):
        return (
            "T",
            pids[id(value.storage)],
            str(value.dtype),
            value.storage_offset,
            value.shape,
            value.stride,
            value.requires_grad,
            value.parameter,
        )
    if isinstance(value, dict):
        return (type(value).__name__, [(k, _describe(v, pids)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_describe(v, pids) for v in value])
    return value


def _read(data: bytes):
    pids: dict[int, object] = {}
    refs: dict[str, StorageRef] = {}

    def load(pid):
        _, kind, key, location, numel = pid
        if key not in refs:
            refs[key] = StorageRef(key, kind if isinstance(kind, DType) else DType("uint8"), numel, location)
            pids[id(refs[key])] = (str(kind), key, location, numel)
        return refs[key]

    return _describe(restricted_load(data, load), pids)


dtypes = st.sampled_from([d for d in DTYPES if not d.startswith(("qint", "quint"))])


@st.composite
def tensors(draw, storages):
    ref = draw(st.sampled_from(storages))
    n = ref.numel
    offset = draw(st.integers(0, max(0, n - 1)))
    length = draw(st.integers(0, n - offset))
    t = LazyTensor(ref, offset, (length,), contiguous_strides((length,)), draw(st.booleans()))
    t.parameter = draw(st.booleans())
    return t


@st.composite
def trees(draw):
    storages = [
        StorageRef(str(i), DType(draw(dtypes)), draw(st.integers(1, 6)), draw(st.sampled_from(["cpu", "cuda:0"])))
        for i in range(draw(st.integers(1, 4)))
    ]
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=False),
        st.text(max_size=6),
        tensors(storages),
    )
    return draw(
        st.recursive(
            leaves,
            lambda kids: st.one_of(
                st.lists(kids, max_size=4),
                st.tuples(kids, kids),
                st.dictionaries(st.text(max_size=4), kids, max_size=5),
                st.dictionaries(st.text(max_size=4), kids, max_size=3).map(collections.OrderedDict),
            ),
            max_leaves=30,
        )
    )


@settings(max_examples=200, deadline=None)
@given(trees())
def test_the_fast_path_writes_what_the_slow_one_writes(tree):
    fast, _ = torch_pickler.pickle_tree(tree)
    assert _read(fast) == _read(_slow(tree))


def test_torch_reads_the_fast_path_as_it_reads_the_slow_one(tmp_path):
    state = {f"layer{i}.weight": torch.randn(3) for i in range(1200)}  # more than one SETITEMS batch
    state["shared"] = state["layer0.weight"][1:]
    state["param"] = torch.nn.Parameter(torch.ones(2))
    state["nested"] = [{"a": (1, 2.5, "x")}, collections.OrderedDict(b=torch.arange(3))]
    torch.save(state, tmp_path / "in.pt")
    from ckpttools.formats.registry import open_checkpoint
    from ckpttools.tensors import TensorSource

    ckpt = open_checkpoint(tmp_path / "in.pt")
    torchzip.write_file(ckpt.tree, tmp_path / "out.pt", TensorSource(ckpt))
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(back) == list(state)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(back[k], v) and type(back[k]) is type(v)
    assert back["shared"].untyped_storage().data_ptr() == back["layer0.weight"].untyped_storage().data_ptr()


def test_names_only_the_slow_path_writes_fall_back_to_it():
    model = placeholder_class(Reference("ultralytics.nn.tasks", "DetectionModel"))()
    for tree in ({"dtype": DType("float32")}, {"model": model}, {"cls": type(model)}):
        data, _ = torch_pickler.pickle_tree(tree)
        assert data == _slow(tree)
