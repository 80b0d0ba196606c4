"""fuse-train's .pt saves written from the snapshot itself (``ckpttools.formats.zipimage``, issue 29): the snapshot's
tensors are slots of one arena laid out as the file, the writer makes one pass over each record (CRC32 and the
digest leaf) and writes the arena with O_DIRECT where the filesystem takes it.

Properties checked on torch's own dtype list and on generated trees: what ``torch.load(weights_only=True)``
reads back is the tree, bit for bit; the archive's CRC32s hold (``zipfile``); ``ckpt verify`` passes and the
recorded digest is the one ``digest_record`` gives the tree; the bytes are the same whether written with
O_DIRECT or with plain writes; a tree that does not match its arena is declined with nothing written."""

from __future__ import annotations

import datetime
import errno
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ckpttools.commands.verify import verify
from ckpttools.digest import DIGEST_KEY, digest_record
from ckpttools.formats import live_torch, zipimage
from ckpttools.formats.zipwriter import header_size
from fuse_train.checkpoint.async_save import HASHED_COPY_MIN, PinnedSnapshot, _balanced
from fuse_train.training.saving import CheckpointingMixin
from tests.test_every_dtype import NAMES, SAVEABLE, element_bytes, same, sample


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and same(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


def _own_storages(tree):
    """The tree with each tensor in a storage of its own (a copy of its bytes)."""
    if isinstance(tree, torch.Tensor):
        own = torch.empty(tree.shape, dtype=tree.dtype)
        if tree.numel():
            element_bytes(own).copy_(element_bytes(tree))  # bytes, not values: dtypes without a copy kernel too
        return own
    if isinstance(tree, dict):
        return type(tree)((k, _own_storages(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(_own_storages(v) for v in tree)
    return tree


def _check_file(path: Path, tree: dict) -> list[str]:
    """The invariants every written file holds."""
    expected = dict(tree)
    expected.pop(DIGEST_KEY)
    assert tree[DIGEST_KEY] == digest_record(expected)  # the one digest_record gives the tree
    assert _same_tree(_load(path), tree)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every record's CRC32
    # ckpt verify's verdict: the one it gives torch.save's file of the same tree (digest checked in both)
    reference = path.with_name(path.stem + "-torch.save.pt")
    torch.save(_own_storages(tree), reference)  # (torch.save refuses one storage viewed as several dtypes)
    codes = sorted(f.code for f in verify(path).findings)
    assert codes == sorted(f.code for f in verify(reference).findings)
    reference.unlink()
    return codes


def _direct_allowed(folder: Path) -> bool:
    """Does this filesystem take O_DIRECT (ext4 does, tmpfs does not)?"""
    probe = folder / ".direct-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        return True
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        return False
    finally:
        probe.unlink(missing_ok=True)


def _write_plain(monkeypatch, *args) -> bool:
    """zipimage.write as on a filesystem without O_DIRECT."""

    def refuse(*_a, **_k):
        raise OSError(errno.EINVAL, "O_DIRECT refused (test)")

    with monkeypatch.context() as m:
        m.setattr(zipimage, "_write_direct", refuse)
        return zipimage.write(*args)


# ---- the plan ------------------------------------------------------------------------------------------------


@given(st.lists(st.integers(0, 3 << 20) | st.integers(0, 64), max_size=40))
def test_the_plan_leaves_room_for_every_header_and_aligns_every_record_as_torch_does(sizes):
    layout = zipimage.plan(sizes)
    assert layout.sizes == tuple(sizes)
    for key, (offset, size) in enumerate(zip(layout.offsets, sizes)):
        assert offset % 64 == 0
        if key:
            gap = offset - (layout.offsets[key - 1] + sizes[key - 1])
            assert (
                header_size(zipimage.record_name(key), size) <= gap < header_size(zipimage.record_name(key), size) + 64
            )
    assert layout.length == (layout.offsets[-1] + sizes[-1] if sizes else 0)


# ---- every dtype torch saves ---------------------------------------------------------------------------------


def _arena_of(values: dict[str, torch.Tensor]) -> tuple[dict, memoryview, zipimage.Plan, list[str]]:
    """The values copied byte for byte into their slots of an arena (as PinnedSnapshot lays them out, without
    its copy kernel: some dtypes have none); the names of the dtypes no byte buffer can be viewed as."""
    layout = zipimage.plan([v.numel() * v.element_size() for v in values.values()])
    raw = torch.zeros(layout.length + zipimage.PAGE, dtype=torch.uint8)
    arena = raw[-raw.data_ptr() % zipimage.PAGE :][: layout.length]
    tree, unplaced = {}, []
    for (name, v), offset in zip(values.items(), layout.offsets):
        slot = arena[offset : offset + v.numel() * v.element_size()]
        slot.copy_(element_bytes(v).reshape(-1))
        try:
            tree[name] = slot.view(v.dtype).view(v.shape)
        except RuntimeError:
            tree[name], unplaced = v, [*unplaced, name]
    return tree, memoryview(arena.numpy()), layout, unplaced


def test_every_dtype_torch_saves_is_written_exactly_or_declined(tmp_path, monkeypatch):
    # one tensor of every dtype
    values = {name: sample(d, 4 << 10) for name, d in zip(NAMES, SAVEABLE)}
    tree, arena, layout, unplaced = _arena_of(values)
    out, plain = tmp_path / "every.pt", tmp_path / "every-plain.pt"
    written = zipimage.write(tree, arena, layout, None, out)
    assert written == (not unplaced)  # a tensor outside the arena: declined, nothing written
    assert out.exists() == written and not unplaced, f"dtypes no byte buffer views: {unplaced}"
    _check_file(out, tree)
    assert _write_plain(monkeypatch, tree, arena, layout, None, plain)
    assert out.read_bytes() == plain.read_bytes()  # O_DIRECT or not, the same file


# ---- generated trees through the trainer's snapshot ------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.complex64]
shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple) | st.sampled_from([(70_000,), (300, 257), ()])
tensors = st.builds(lambda s, d, seed: _tensor(s, d, seed), shapes, st.sampled_from(DTYPES), st.integers(0, 99))
plain = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=5)
trees = st.recursive(
    tensors | plain,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.lists(kids, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)


def _tensor(shape, dtype, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 200, shape, generator=g)
    return values.to(dtype) if dtype != torch.complex64 else torch.complex(values.float(), -values.float())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(max_size=6), trees, min_size=1, max_size=5))
@example({"": torch.tensor(44.0), "epoch": []})  # a key a layout knows: its verdict, the same for torch.save's file
def test_a_snapshot_of_any_tree_is_written_exactly_with_or_without_o_direct(tmp_path, monkeypatch, tree):
    snapshot = PinnedSnapshot(file_image=True)
    copy = snapshot.take(tree)
    for old in tmp_path.glob("*.pt"):
        old.unlink()
    assert zipimage.write(copy, *snapshot.image, tmp_path / "a.pt")
    codes = _check_file(tmp_path / "a.pt", copy)
    # whatever a layout makes of the keys, nothing about the container, its bytes or its digest
    assert not [c for c in codes if c.split(".")[0] in ("zip", "file", "storage", "tensor", "digest", "values")]
    assert _write_plain(monkeypatch, copy, *snapshot.image, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    # the hashes taken while copying: one for each slot the hashing copy filled, and the file the writer's own
    # pass writes without them
    arena, layout, known = snapshot.image
    big = [i for i, n in enumerate(layout.sizes) if n >= HASHED_COPY_MIN]
    assert [i for i, h in enumerate(known or []) if h is not None] == big
    assert zipimage.write(copy, arena, layout, None, tmp_path / "c.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "c.pt").read_bytes()


def test_o_direct_is_used_exactly_where_the_filesystem_takes_it(tmp_path, monkeypatch):
    tree = {"w": torch.randn(300_000), "b": torch.randn(7)}
    snapshot = PinnedSnapshot(file_image=True)
    copy = snapshot.take(tree)
    used, direct = [], zipimage._write_direct
    monkeypatch.setattr(zipimage, "_write_direct", lambda *a: (used.append(a[0]), direct(*a)))
    folders = [tmp_path] + ([Path("/dev/shm")] if Path("/dev/shm").is_dir() else [])  # tmpfs: no O_DIRECT
    for folder in folders:
        out = folder / f"direct-{os.getpid()}.pt"
        try:
            used.clear()
            assert zipimage.write(copy, *snapshot.image, out)
            _check_file(out, copy)
            assert bool(used) == _direct_allowed(folder), folder
        finally:
            out.unlink(missing_ok=True)


# ---- the snapshot reused, and trees that do not match -----------------------------------------------------------


def test_the_arena_is_reused_while_the_tree_keeps_its_shapes_and_planned_anew_when_they_change(tmp_path):
    snapshot = PinnedSnapshot(file_image=True)
    tree = {"model": {"w": torch.randn(50_000), "b": torch.zeros(3)}, "step": 1}
    first = snapshot.take(tree)
    arena = snapshot.arena
    assert zipimage.write(first, *snapshot.image, tmp_path / "first.pt")
    _check_file(tmp_path / "first.pt", first)
    tree["model"]["w"].add_(1)
    tree["step"] = 2
    second = snapshot.take(tree)
    assert snapshot.arena is arena and second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()
    # the second save: the same slots (their descriptions kept from the first), new values
    assert zipimage.write(second, *snapshot.image, tmp_path / "second.pt")
    _check_file(tmp_path / "second.pt", second)
    assert torch.equal(_load(tmp_path / "second.pt")["model"]["w"], tree["model"]["w"])
    assert _load(tmp_path / "second.pt")["step"] == 2 and _load(tmp_path / "first.pt")["step"] == 1
    tree["model"]["extra"] = torch.ones(4, 4)  # a new tensor: a new plan
    third = snapshot.take(tree)
    assert snapshot.arena is not arena and len(snapshot.layout.sizes) == 3
    assert zipimage.write(third, *snapshot.image, tmp_path / "third.pt")
    _check_file(tmp_path / "third.pt", third)


@given(st.lists(st.tuples(st.integers(0, 9000), st.integers(0, 2**32 - 1)), min_size=2, max_size=4))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_saves_that_reuse_the_arena_write_the_bytes_a_fresh_arena_writes(tmp_path, saves):
    """From the second save on, the local headers are already in the arena's gaps and only their CRC32s are
    rewritten; a longer data.pkl moves the arena to another page of the file (new headers).  Either way each
    file is the one a fresh snapshot writes for the same tree, and reads back exactly."""
    snapshot = PinnedSnapshot(file_image=True)
    tree = {"model": {"w": torch.zeros(3000), "b": torch.zeros(5), "h": torch.zeros(7, dtype=torch.float16)}}
    for length, seed in saves:
        g = torch.Generator().manual_seed(seed)
        for t in tree["model"].values():
            t.copy_(torch.randn(t.shape, generator=g))
        tree["note"] = "x" * length  # data.pkl's length: where the arena starts in the file
        copy = snapshot.take(tree)
        assert zipimage.write(copy, *snapshot.image, tmp_path / "reused.pt")
        fresh = PinnedSnapshot(file_image=True)
        fresh_copy = fresh.take(tree)
        assert zipimage.write(fresh_copy, *fresh.image, tmp_path / "fresh.pt")
        assert (tmp_path / "reused.pt").read_bytes() == (tmp_path / "fresh.pt").read_bytes()
        with zipfile.ZipFile(tmp_path / "reused.pt") as zf:
            assert zf.testzip() is None
        assert _same_tree(_load(tmp_path / "reused.pt"), copy)
    assert len(snapshot.layout.headers) == 1  # the headers of the last save only


def test_views_whose_values_are_not_their_memory_are_copied_by_value(tmp_path):
    # a transposed, a conjugated and a negated view: torch copies their values; the hashing copy, which copies
    # memory as it lies, leaves them alone (their hashes taken by the writer)
    base = torch.randn(400, 300)
    complex_values = torch.complex(torch.randn(40_000), torch.randn(40_000))
    tree = {"t": base.T, "conj": complex_values.conj(), "neg": torch._neg_view(base), "plain": base}
    snapshot = PinnedSnapshot(file_image=True)
    copy = snapshot.take(tree)
    resolved = {k: v.resolve_conj().resolve_neg() for k, v in tree.items()}
    assert all(torch.equal(copy[k].resolve_conj().resolve_neg(), v) for k, v in resolved.items())
    _, layout, known = snapshot.image
    assert [k for k, h in zip(tree, known, strict=True) if h is not None] == ["plain"]
    assert zipimage.write(copy, *snapshot.image, tmp_path / "views.pt")
    back = _load(tmp_path / "views.pt")
    assert all(torch.equal(back[k], v.resolve_conj().resolve_neg()) for k, v in tree.items())
    _check_file(tmp_path / "views.pt", copy)


def test_hashed_copies_are_shared_evenly_among_the_threads():
    jobs = [(n, i, 0) for i, n in enumerate([900, 500, 400, 300, 300, 100, 100, 100])]
    for workers in (1, 2, 3, 4, 20):
        runs = _balanced(jobs, workers)
        assert sorted(j for run in runs for j in run) == sorted(jobs)  # each job once
        loads = [sum(n for n, _, _ in run) for run in runs]
        assert len(runs) == min(workers, len(jobs)) and max(loads) - min(loads) <= max(n for n, _, _ in jobs)


def test_a_tree_that_does_not_match_its_arena_is_declined_with_nothing_written(tmp_path):
    snapshot = PinnedSnapshot(file_image=True)
    copy = snapshot.take({"a": torch.randn(1000), "b": torch.randn(2000)})
    cases = {
        "a tensor outside the arena": {**copy, "c": torch.randn(3)},
        "another order": {"b": copy["b"], "a": copy["a"]},
        "a view of part of a slot": {"a": copy["a"][:10], "b": copy["b"]},
        "not a plain tree": {**copy, "m": torch.nn.Linear(2, 2)},
    }
    for name, tree in cases.items():
        out = tmp_path / "declined.pt"
        assert not zipimage.write(tree, *snapshot.image, out), name
        assert not out.exists(), name


def test_the_file_is_as_long_as_live_torch_writes_it_but_for_the_page_the_arena_starts_on(tmp_path):
    for name, tree in {
        "many tiny": {f"t{i}": torch.full((3,), float(i)) for i in range(3000)},
        "a model": {f"layer{i}.weight": torch.randn(64, 3 + i) for i in range(30)},
    }.items():
        snapshot = PinnedSnapshot(file_image=True)
        copy = snapshot.take(tree)
        assert zipimage.write(copy, *snapshot.image, tmp_path / "ours.pt")
        _check_file(tmp_path / "ours.pt", copy)
        with open(tmp_path / "stream.pt", "wb") as f:  # the same records, written one after the other
            assert live_torch.save(_own_storages(copy), f)
        extra = (tmp_path / "ours.pt").stat().st_size - (tmp_path / "stream.pt").stat().st_size
        assert 0 <= extra < zipimage.PAGE, name


@pytest.mark.parametrize("key", ["a/b", "a"])
def test_keys_that_print_alike_get_buffers_of_their_own(key):
    # "a/b" at the top and "b" under "a" once shared one buffer name in the snapshot
    tree = {"a/b": torch.zeros(2), "a": {"b": torch.ones(2)}}
    copy = PinnedSnapshot(file_image=key == "a").take(tree)
    assert torch.equal(copy["a/b"], torch.zeros(2)) and torch.equal(copy["a"]["b"], torch.ones(2))


def test_what_the_arena_declines_the_trainer_still_writes_exactly(tmp_path):
    # a tree beside its arena (a tensor outside it), and one only torch.save writes (an object): the trainer's
    # save falls back to live_torch with each slot a storage of its own, then to torch.save on copies
    snapshot = PinnedSnapshot(file_image=True)
    copy = snapshot.take({"w": torch.randn(100_000), "n": torch.tensor(3, dtype=torch.int64)})
    saver = SimpleNamespace(snapshot=snapshot)
    for name, tree in {
        "outside": {**copy, "extra": torch.randn(5)},
        "object": {**copy, "when": datetime.date(2026, 12, 5)},
    }.items():
        out = tmp_path / f"{name}.pt"
        assert not zipimage.write(dict(tree), *snapshot.image, out)
        CheckpointingMixin._write_file(saver, tree, out)
        back = torch.load(out, weights_only=name != "object")
        assert _same_tree({k: back[k] for k in copy}, copy), name
        assert back[DIGEST_KEY] == tree[DIGEST_KEY] == digest_record({k: v for k, v in tree.items() if k != DIGEST_KEY})


def test_a_stand_in_for_the_digest_met_elsewhere_in_the_pickle_is_never_patched(tmp_path, monkeypatch):
    # the digest is patched into the pickle in place of a random stand-in; were its bytes also a value of the
    # tree, the pickle is made again instead
    same = "7" * 32
    monkeypatch.setattr(zipimage.uuid, "uuid4", lambda: SimpleNamespace(hex=same[:16] + same[16:]))  # equal, not same
    snapshot = PinnedSnapshot(file_image=True)
    copy = snapshot.take({"w": torch.randn(1000), "note": same})
    assert zipimage.write(copy, *snapshot.image, tmp_path / "a.pt")
    _check_file(tmp_path / "a.pt", copy)
    assert _load(tmp_path / "a.pt")["note"] == same
