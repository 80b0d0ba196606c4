"""Bounded work on shared object graphs (issue 25): a pickle's memo lets one container appear under many
names, so ``x = [x, x]`` nested 64 times is a 2 kB file with 2**64 paths (``torch.load`` reads it in a moment;
it is a DAG).  Every walk visits each container once; every command answers in bounded time, memory and
output; conversions keep the sharing (HDF5 as hard links, .pt through the pickle's memo)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpttools.formats.base import to_plain_tree
from ckpttools.objects import Placeholder  # noqa: F401 - walked through by the same helpers
from ckpttools.tensors import DType, LazyTensor, StorageRef, contiguous_strides
from ckpttools.trees import iter_tensors, map_tensors

LIMIT_S, LIMIT_RSS_KB, LIMIT_OUTPUT = 20, 1_200_000, 200_000


def _lazy(i: int) -> LazyTensor:
    return LazyTensor(StorageRef(str(i), DType("float32"), 2, "cpu", None), 0, (2,), contiguous_strides((2,)))


@st.composite
def dags(draw):
    """A random DAG: node k is a list or dict whose children are tensors or earlier nodes (shared freely)."""
    tensors = [_lazy(i) for i in range(draw(st.integers(1, 3)))]
    nodes: list = []
    for _ in range(draw(st.integers(1, 12))):
        pool = tensors + nodes
        children = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
        nodes.append(children if draw(st.booleans()) else {f"k{i}": c for i, c in enumerate(children)})
    return nodes[-1], nodes, tensors


def _edges_to_tensors(root) -> int:
    """Tensor edges of the containers reachable from root, each container counted once (the bound)."""
    seen, stack, count = set(), [root], 0
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        children = list(node.values()) if isinstance(node, dict) else list(node)
        count += sum(isinstance(c, LazyTensor) for c in children)
        stack.extend(c for c in children if not isinstance(c, LazyTensor))
    return count


@settings(max_examples=200, deadline=None)
@given(dags())
def test_iter_tensors_enters_each_container_once(dag):
    root, nodes, tensors = dag
    found = list(iter_tensors(root))
    assert len(found) == _edges_to_tensors(root)  # one per tensor edge of each container, never per path
    reachable = {id(t) for _, t in found}
    assert reachable <= {id(t) for t in tensors}


@settings(max_examples=200, deadline=None)
@given(dags())
def test_map_tensors_and_to_plain_tree_keep_the_sharing(dag):
    root = dag[0]
    for copy in (map_tensors(root, lambda t: t), to_plain_tree(root, [])):
        pairs: dict[int, int] = {}  # original container id -> copy id: must be a bijection
        stack = [(root, copy)]
        while stack:
            a, b = stack.pop()
            if isinstance(a, LazyTensor):
                assert b is a
                continue
            if id(a) in pairs:
                assert pairs[id(a)] == id(b), "a shared container was copied twice"
                continue
            pairs[id(a)] = id(b)
            assert type(a) is type(b) and len(a) == len(b)
            stack.extend(zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b))
        assert len(set(pairs.values())) == len(pairs)


# ---- the attack files, every command ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dag")
    t = torch.arange(4.0)
    x: object = [t]
    for _ in range(64):
        x = [x, x]
    d: object = {"t": t}
    for _ in range(64):
        d = {"a": d, "b": d}
    files = {
        "lists": (folder / "lists.pt", x),
        "dicts": (folder / "dicts.pt", d),
        "mixed": (folder / "mixed.pt", {"model": {"w": t}, "meta": [d, x, {"again": d}]}),
    }
    for path, value in files.values():
        torch.save(value, path)
        assert path.stat().st_size < 10_000  # a few kB: the whole attack
    paths = {name: path for name, (path, _) in files.items()}
    paths["deep"] = _deep_file(folder / "deep.pt")
    return paths


def _deep_file(path: Path, depth: int = 200_000) -> Path:
    """A tensor under 200,000 nested lists: pickle itself cannot write this (it recurses), so the opcodes are
    written here around a torch.save pickle, and the storage record is torch's own."""
    import zipfile

    source = path.with_suffix(".src")
    torch.save({"w": torch.ones(2)}, source)
    with zipfile.ZipFile(source) as z:
        records = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as out:
        for info, data in records:
            if info.filename.endswith("data.pkl"):
                assert data.startswith(b"\x80\x02") and data.endswith(b".")
                data = b"\x80\x02}X\x04\x00\x00\x00deep" + b"]" * depth + data[2:-1] + b"a" * depth + b"s."
            out.writestr(info, data)
    return path


RUN = """
import resource, sys
from ckpttools.cli import main
try:
    main(sys.argv[1:])
finally:
    print("\\nRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _ckpt(args: list[str]) -> tuple[int, str, int]:
    proc = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=LIMIT_S)
    rss = int(proc.stderr.rsplit("RSS_KB", 1)[1].split()[0])
    return proc.returncode, proc.stdout + proc.stderr.rsplit("RSS_KB", 1)[0], rss


COMMANDS = ["verify", "inspect", "diff", "convert-safetensors", "convert-h5", "convert-pt", "repair"]


def run_bounded(command: str, src: Path, out: Path) -> tuple[int, str]:
    """One of COMMANDS on ``src`` (outputs in the folder ``out``), held to the limits: a documented exit code,
    no traceback, at most LIMIT_S seconds, LIMIT_RSS_KB of memory and LIMIT_OUTPUT characters printed."""
    args = {
        "verify": ["verify", str(src)],
        "inspect": ["inspect", str(src)],
        "diff": ["diff", str(src), str(src)],
        "repair": ["repair", str(src), "-o", str(out / "r.pt")],
    }.get(command)
    if args is None:
        args = ["convert", str(src), str(out / f"out.{command.split('-')[1]}")]
    code, output, rss = _ckpt(args)
    assert code in (0, 1, 2), output[-2000:]
    assert "Traceback" not in output and len(output) <= LIMIT_OUTPUT and rss <= LIMIT_RSS_KB, (
        rss,
        len(output),
        output[-500:],
    )
    return code, output


@pytest.mark.slow  # 28 processes (each imports torch): CI runs them, -m "not slow" keeps the in-process tests
@pytest.mark.parametrize("name", ["lists", "dicts", "mixed", "deep"])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_bounded_on_shared_graphs(hostile, tmp_path, name, command):
    run_bounded(command, hostile[name], tmp_path)


def _depth_of_sharing(value, steps: int = 64) -> bool:
    """``value[0] is value[1]`` (or ['a'] is ['b']) all the way down: the sharing survived."""
    for _ in range(steps):
        a, b = (value[0], value[1]) if isinstance(value, list) else (value["a"], value["b"])
        if a is not b:
            return False
        value = a
    return True


@pytest.mark.slow  # one process per conversion
@pytest.mark.parametrize("name", ["lists", "dicts"])
@pytest.mark.parametrize("via", ["pt", "h5"])
def test_conversions_keep_the_graph(hostile, tmp_path, name, via):
    middle = tmp_path / f"middle.{via}"
    assert _ckpt(["convert", str(hostile[name]), str(middle)])[0] == 0
    back = tmp_path / "back.pt"
    assert _ckpt(["convert", str(middle), str(back)])[0] == 0 if via == "h5" else True
    loaded = torch.load(back if via == "h5" else middle, weights_only=True)
    if via == "h5" and name == "lists":
        loaded = loaded["value"]  # HDF5's root is a group: a list root is stored under "value"
    assert _depth_of_sharing(loaded)


@pytest.mark.slow  # two 2-million-item files and two diff processes
def test_a_two_million_item_list_is_diffed_in_bounded_time_and_output(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"model": {"w": torch.ones(2)}, "losses": list(range(2_000_000))}, a)
    torch.save({"model": {"w": torch.ones(2)}, "losses": list(range(1, 2_000_001))}, b)
    for left, right, expected in ((a, a, 0), (a, b, 1)):
        code, output, rss = _ckpt(["diff", str(left), str(right)])
        assert code == expected and "Traceback" not in output, output[-2000:]
        assert len(output) <= LIMIT_OUTPUT and rss <= LIMIT_RSS_KB, (rss, len(output))
