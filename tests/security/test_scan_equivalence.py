"""The fast opcode scanner (``pickle/scan.py``, one loop, common opcodes decoded in place) gives the verdicts of
the step-by-step model it replaced (``reference_scan.py``: pickletools' own opcode reader), on generated
pickles of every protocol -- values, references, calls, constructions, memo reuse -- on the same pickles with
bytes flipped or cut, and on the attack corpus."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpttools.pickle.policy import judge
from ckpttools.pickle.scan import ARGUMENT_CHECKED, scan_pickle
from tests.security.corpus import Built, Call, Ref, dumps
from tests.security.reference_scan import reference_scan

NAMES = [
    ("posix", "system"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("collections", "OrderedDict"),
    ("copyreg", "_reconstructor"),
    ("_codecs", "encode"),
    ("builtins", "getattr"),
    ("torch", "float32"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("__builtin__", "set"),
    ("ultralytics.nn.tasks", "Model"),
]

refs = st.builds(lambda n, stack: Ref(*n, stack=stack), st.sampled_from(NAMES), st.booleans())
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    refs,
)


def _extend(children):
    return st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=4), children, max_size=4),
        st.builds(lambda f, a: Call(f, *a), refs, st.lists(children, max_size=3)),
        st.builds(lambda c, a, s: Built(c, tuple(a), s), refs, st.lists(children, max_size=2), children),
        st.frozensets(st.integers(0, 5), max_size=3),
    )


objects = st.recursive(leaves, _extend, max_leaves=25)


def _same_verdict(data: bytes) -> None:
    fast, ref = scan_pickle(data), reference_scan(data)
    assert (fast.error is None) == (ref.error is None), (fast.error, ref.error)
    if fast.error is None:
        assert fast.uses == ref.uses and fast.problems == ref.problems
        assert (fast.end, fast.protocol) == (ref.end, ref.protocol)
        assert fast.calls == [c for c in ref.calls if c.ref in ARGUMENT_CHECKED]
        assert sorted(map(repr, judge(fast))) == sorted(map(repr, judge(ref)))
    else:  # both could not follow the stream: both verdicts say dangerous (the messages may word it apart)
        assert any(j.status == "dangerous" for j in judge(fast)) and any(j.status == "dangerous" for j in judge(ref))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects, st.integers(0, 5))
def test_same_verdicts_on_generated_pickles(obj, protocol):
    _same_verdict(dumps(obj, protocol))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects, st.integers(0, 5), st.data())
def test_same_verdicts_on_damaged_pickles(obj, protocol, data):
    raw = bytearray(dumps(obj, protocol))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]  # cut anywhere
    else:
        for _ in range(data.draw(st.integers(1, 3))):  # any byte set to anything
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    _same_verdict(bytes(raw))


def test_same_verdicts_on_plain_pickles_of_every_protocol():
    value = {
        "a": [1, 2.5, "x", b"y", None, True],
        "b": (1, 2, 3),
        "c": {1, 2},
        "d": frozenset({3}),
        "e": bytearray(b"z"),
        "big": 2**100,
        "neg": -5,
        "nested": [[[]]],
    }
    value["self"] = value["a"]  # memo reuse
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        _same_verdict(pickle.dumps(value, protocol))


# the memo as the scan keeps it (a list for keys in order, a dict for the rest) against a plain dict: keys in order,
# repeated, out of order, negative (text-protocol PUT/GET take any integer) and MEMOIZE's len(memo)
memo_ops = st.lists(
    st.tuples(st.sampled_from(["put", "get", "memoize"]), st.one_of(st.integers(-3, 40), st.just(None))),
    max_size=80,
)


@given(memo_ops)
def test_the_scans_memo_behaves_as_a_dict(ops):
    from ckpttools.pickle.scan_model import Memo

    memo, plain = Memo(), {}
    for i, (op, key) in enumerate(ops):
        key = len(memo.seq) if key is None else key  # the common case: the next key in order
        if op == "memoize":
            key = len(plain)
            assert len(memo) == key
        if op in ("put", "memoize"):
            memo.put(key, i)
            plain[key] = i
        elif key in plain:
            assert memo.get(key) == plain[key]
        else:
            with pytest.raises(ValueError, match="read before it was written"):
                memo.get(key)
        assert len(memo) == len(plain)
