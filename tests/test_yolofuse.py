"""YOLOFuse as a named trainer (issue 27): genuine YOLOFuse checkpoints (fixtures/yolofuse, written by YOLOFuse's own
trainer by fixtures/make_yolofuse.py; YOLOFuse is not on PyPI) are recognised as ``yolofuse``, their fusion and
input channels named, and the preflight compares ``ch`` and ``fraction`` with what YOLOFuse does on resume.  Late
fusion, too large a file to commit, and arbitrary layer graphs are built here from stand-in classes that pickle
under YOLOFuse's module names."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ckpttools.cli import main as ckpt
from ckpttools.formats.registry import open_checkpoint
from ckpttools.layouts import recognise
from ckpttools.trainers.yolofuse import fusion_of

HERE = Path(__file__).resolve().parents[1] / "fixtures" / "yolofuse"
MANIFEST = json.loads((HERE / "manifest.json").read_text())


def run(*args: str):
    return CliRunner().invoke(ckpt, [*args], env={"COLUMNS": "200"})


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_genuine_yolofuse_files_are_named_with_their_fusion_and_channels(name):
    entry = MANIFEST[name]
    verify = run("verify", str(HERE / name), "--json")
    report = json.loads(verify.output)
    assert verify.exit_code == 0 and not [f for f in report["findings"] if f["severity"] == "error"]
    assert report["layout"] == "yolofuse"
    summary = json.loads(run("inspect", str(HERE / name), "--json").output)
    assert summary["layout"] == "yolofuse" and summary["parameter_count"] == entry["parameters"]
    assert summary["model"]["fusion"].split()[0] == entry["fusion"]
    assert summary["model"]["input"].startswith(f"{entry['ch']} channels (RGB + infrared)")
    text = run("inspect", str(HERE / name)).output
    assert f"fusion: {entry['fusion']} (" in text


def test_the_preflight_compares_ch_and_fraction_and_says_what_yolofuse_does_with_them():
    path = str(HERE / "early_fusion_last.pt")
    same = json.loads(run("preflight", path, "--json").output)
    assert {c["field"] for c in same["checks"]} >= {"ch", "fraction", "batch", "img-size"} and same["ok"]
    blocked = run("preflight", path, "--ch", "3", "--fraction", "0.5", "--json")
    report = json.loads(blocked.output)
    assert blocked.exit_code == 3 and set(report["blocked"]) == {"ch", "fraction"}
    notes = {c["field"]: c["note"] for c in report["checks"]}
    assert "input channels come from the checkpoint" in notes["ch"]
    assert "ignores it on resume without a warning" in notes["fraction"]  # 8.3 drops it silently
    allowed = run("preflight", path, "--fraction", "0.5", "--allow-change", "fraction", "--json")
    assert allowed.exit_code == 0 and json.loads(allowed.output)["allowed"] == ["fraction"]


def test_two_genuine_files_diff_and_convert_without_error(tmp_path):
    a, b = (str(HERE / n) for n in sorted(MANIFEST))
    assert run("diff", a, b).exit_code == 1  # two different models: a difference, not a failure
    out = tmp_path / "early.safetensors"
    converted = run("convert", a, str(out))
    assert converted.exit_code == 0, converted.output
    from safetensors.torch import load_file

    weights = load_file(out)
    assert sum(t.numel() for k, t in weights.items() if not k.endswith(("running_mean", "running_var"))) > 0


# ---- stand-in classes under YOLOFuse's module names: graphs no committed file holds ---------------------------


STAND_INS = {
    "ultralytics.nn.tasks": ["DetectionModel"],
    "ultralytics.nn.modules.block": ["IdentityInput", "ModalitySelector", "ModalConcat", "C2f"],
    "ultralytics.nn.modules.conv": ["Conv", "Concat"],
    "ultralytics.nn.modules.head": ["Detect"],
}


@contextlib.contextmanager
def stand_in_classes():
    """Module classes whose pickles name ``ultralytics.nn.modules.*`` as YOLOFuse's do.  pickle saves a class by
    module + name and checks it can import it back, so stand-in modules replace those names in ``sys.modules``
    while the block runs (the genuine Ultralytics, if imported, is put back after)."""
    # the parent packages too: pickle imports the module by name, which would import the genuine Ultralytics
    classes, modules = (
        {},
        {name: types.ModuleType(name) for name in ("ultralytics", "ultralytics.nn", "ultralytics.nn.modules")},
    )
    for module, names in STAND_INS.items():
        modules[module] = mod = types.ModuleType(module)
        for name in names:
            classes[name] = type(name, (nn.Module,), {"__module__": module, "__qualname__": name})
            setattr(mod, name, classes[name])
    with mock.patch.dict(sys.modules, modules):
        yield classes


@pytest.fixture
def yolofuse_classes():
    with stand_in_classes() as classes:
        yield classes


def _model(classes, graph: list[tuple[str, object, int]]):
    """A DetectionModel whose ``model`` Sequential holds layers (class name, ``f``, stride of its conv)."""
    model = classes["DetectionModel"]()
    seq = nn.Sequential()
    for i, (name, f, stride) in enumerate(graph):
        layer = classes[name]()
        layer.i, layer.f, layer.type = i, f, f"ultralytics.{name}"
        if name == "Conv":
            layer.conv = nn.Conv2d(1, 1, 1, stride=stride, bias=False)
        seq.add_module(str(i), layer)
    model.model = seq
    return model


def _saved(tmp_path, classes, graph, name="m.pt"):
    path = tmp_path / name
    torch.save({"epoch": -1, "model": _model(classes, graph), "train_args": {"ch": 6, "data": "x.yaml"}}, path)
    return path


STREAMS = [("IdentityInput", -1, 1), ("ModalitySelector", -1, 1), ("ModalitySelector", -2, 1)]


def test_decision_level_fusion_is_late_and_channel_concat_is_early(tmp_path, yolofuse_classes):
    late = STREAMS + [("Conv", 1, 2), ("Conv", 2, 2), ("Conv", -2, 2), ("Conv", -2, 2), ("Detect", [5, 6], 1)]
    summary = json.loads(run("inspect", str(_saved(tmp_path, yolofuse_classes, late)), "--json").output)
    assert summary["layout"] == "yolofuse" and summary["model"]["fusion"].startswith("late (decision level")
    data_level = [("ModalConcat", [-1], 1), ("Conv", -1, 2), ("Detect", [1], 1)]
    summary = json.loads(run("inspect", str(_saved(tmp_path, yolofuse_classes, data_level, "d.pt")), "--json").output)
    assert summary["model"]["fusion"].startswith("early (data level")
    # streams joined after three stride-2 convolutions (stride 8): mid; after two (stride 4): early
    for convs, kind in ((3, "mid"), (2, "early")):
        chain = [("Conv", 1 if k == 0 else -2, 2) for k in range(convs)]
        other = [("Conv", 2 if k == 0 else -2, 2) for k in range(convs)]
        interleaved = [layer for pair in zip(chain, other) for layer in pair]
        graph = STREAMS + interleaved + [("Concat", [-2, -1], 1), ("C2f", -1, 1), ("Detect", [-1], 1)]
        tree = open_checkpoint(_saved(tmp_path, yolofuse_classes, graph, f"{kind}.pt")).tree
        assert fusion_of(tree).kind == kind, fusion_of(tree)


LAYER = st.tuples(
    st.sampled_from(["IdentityInput", "ModalitySelector", "ModalConcat", "Conv", "Concat", "C2f", "Detect"]),
    st.one_of(st.integers(-8, 12), st.lists(st.integers(-8, 12), max_size=4), st.none(), st.text(max_size=2)),
    st.sampled_from([1, 2]),
)


@settings(max_examples=60, deadline=None)
@given(graph=st.lists(LAYER, min_size=1, max_size=14))
def test_any_layer_graph_gets_a_fusion_or_none_never_an_exception(graph):
    with stand_in_classes() as classes, tempfile.TemporaryDirectory() as tmp:
        tree = open_checkpoint(_saved(Path(tmp), classes, graph)).tree
    fusion = fusion_of(tree)
    assert fusion is None or fusion.kind in ("early", "mid", "late")
    assert recognise(tree) == "yolofuse"  # train_args.ch alone names it
