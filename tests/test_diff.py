"""ckpt diff: keys, shapes, dtypes, values, tolerances, formats, prefixes, metadata."""

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

from ckpttools.cli import main as ckpt
from ckpttools.commands.diff import diff_checkpoints


def _run(args):
    return CliRunner().invoke(ckpt, args)


def _sd(**overrides):
    g = torch.Generator().manual_seed(0)
    sd = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv.bias": torch.zeros(8),
        "head.weight": torch.randn(4, 8, generator=g),
    }
    sd.update(overrides)
    return sd


def test_identical_files(tmp_path):
    torch.save(_sd(), tmp_path / "a.pt")
    torch.save(_sd(), tmp_path / "b.pt")
    result = _run(["diff", "--json", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    assert result.exit_code == 0
    out = json.loads(result.output)
    assert out["verdict"] == "identical" and out["identical_tensors"] == 3
    assert {"verdict", "only_in_a", "only_in_b", "changed", "metadata"} <= out.keys()


def test_tolerance_edges(tmp_path):
    a = _sd()
    b = _sd(**{"head.weight": a["head.weight"] + 1e-3})
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    loose = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt", atol=2e-3)
    tight = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt", atol=5e-4)
    assert loose.verdict == "within_tolerance" and tight.verdict == "different"
    (d,) = tight.changed
    assert d.name == "head.weight" and d.outside == 32 and d.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert d.rel_l2 == pytest.approx(
        float((b["head.weight"] - a["head.weight"]).norm() / a["head.weight"].norm()), rel=1e-6
    )
    assert _run(["diff", "--atol", "2e-3", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]).exit_code == 0
    assert _run(["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]).exit_code == 1
    rel = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt", rtol=10.0, atol=0.0)
    assert rel.verdict == "within_tolerance"


def test_keys_shapes_dtypes_and_nan(tmp_path):
    a = _sd(extra=torch.ones(2))
    nan = a["head.weight"].clone()
    nan[0, 0] = float("nan")
    b = _sd(
        **{
            "conv.bias": torch.zeros(9),
            "conv.weight": a["conv.weight"].half(),
            "head.weight": nan,
            "new": torch.ones(1),
        }
    )
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    r = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt")
    by = {d.name: d for d in r.changed}
    assert by["conv.bias"].note == "shape changed" and by["conv.weight"].note == "dtype changed"
    assert by["head.weight"].nonfinite_b == 1 and by["head.weight"].outside == 1
    assert [i["name"] for i in r.only_in_a] == ["extra"] and [i["name"] for i in r.only_in_b] == ["new"]
    assert r.verdict == "different"


def test_prefix_normalisation(tmp_path):
    torch.save(_sd(), tmp_path / "a.pt")
    torch.save({"module." + k: v for k, v in _sd().items()}, tmp_path / "b.pt")
    r = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt")
    assert r.verdict == "identical" and any("module." in n for n in r.notes)
    raw = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt", strip_prefix=False)
    assert len(raw.only_in_a) == 3 and len(raw.only_in_b) == 3


def test_cross_format_pt_against_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.save(
        {
            "state_dict": _sd(),
            "epoch": 3,
            "global_step": 30,
            "optimizer_states": [],
            "pytorch-lightning_version": "2.4",
        },
        tmp_path / "a.ckpt",
    )
    save_file(_sd(), tmp_path / "b.safetensors")
    r = diff_checkpoints(tmp_path / "a.ckpt", tmp_path / "b.safetensors")
    assert r.same == 3 and not r.changed and not r.only_in_a and not r.only_in_b


def test_metadata_differences_by_field_and_sections(tmp_path):
    base = {
        "format": "fuse-train-checkpoint",
        "format_version": 1,
        "model": _sd(),
        "ema": _sd(),
        "updates": 5,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"params": [0], "lr": 0.1}]},
        "epoch": 1,
        "best_fitness": 0.5,
        "train_args": {"lr0": 0.01, "batch": 16},
        "date": "x",
    }
    other = dict(
        base,
        train_args={"lr0": 0.02, "batch": 16},
        date="y",
        optimizer={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"params": [0], "lr": 0.1}]},
    )
    torch.save(base, tmp_path / "a.pt")
    torch.save(other, tmp_path / "b.pt")
    r = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt")
    assert {"field": "train_args.lr0", "a": 0.01, "b": 0.02} in r.metadata
    assert "date" in r.ignored_metadata and not any(m["field"] == "date" for m in r.metadata)
    assert [d.section for d in r.changed] == ["optimizer"]
    only_model = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt", sections=("model", "ema"))
    assert only_model.verdict == "identical"


def test_missing_and_bad_inputs_and_inputs_unchanged(tmp_path):
    torch.save(_sd(), tmp_path / "a.pt")
    before = hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    result = _run(["diff", str(tmp_path / "a.pt"), str(tmp_path / "nope.pt")])
    assert result.exit_code == 2 and "no such file" in result.output
    (tmp_path / "junk.pt").write_bytes(b"\x89PNG\r\n\x1a\n....")
    result = _run(["diff", str(tmp_path / "a.pt"), str(tmp_path / "junk.pt")])
    assert result.exit_code == 2 and "PNG" in result.output and "Traceback" not in result.output
    assert hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest() == before


@pytest.mark.slow
def test_epoch_n_against_epoch_n_plus_1(reference_run):
    weights = reference_run[0] / "weights"
    r = diff_checkpoints(weights / "epoch2.pt", weights / "last.pt")
    assert r.verdict == "different" and r.changed and {"field": "epoch", "a": 1, "b": 2} in r.metadata
    assert diff_checkpoints(weights / "last.pt", weights / "last.pt").verdict == "identical"


def test_dcp_folder_against_consolidated_pt(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state = {"model": _sd(), "epoch": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-process DCP save
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
        dcp_to_torch_save(str(tmp_path / "dcp"), str(tmp_path / "one.pt"))
    r = diff_checkpoints(tmp_path / "dcp", tmp_path / "one.pt")
    assert r.verdict == "identical" and r.same == 3, r.to_dict()
    changed = {"model": _sd(**{"conv.bias": torch.ones(8)}), "epoch": 3}
    torch.save(changed, tmp_path / "changed.pt")
    r = diff_checkpoints(tmp_path / "dcp", tmp_path / "changed.pt")
    assert [d.name for d in r.changed] == ["conv.bias"]  # the model section of a generic {"model": ...} dict


def test_tensors_with_equal_zip_crcs_are_not_read_unless_exact(tmp_path):
    torch.manual_seed(0)
    tree = {"model": {f"w{i}": torch.randn(64, 64) for i in range(4)}}
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(tree, a)
    tree["model"]["w0"] = tree["model"]["w0"] + 1
    torch.save(tree, b)
    fast = diff_checkpoints(a, b)
    assert fast.verdict == "different" and fast.same == 3 and fast.equal_by_crc == 3
    exact = diff_checkpoints(a, b, exact=True)
    assert exact.verdict == "different" and exact.same == 3 and exact.equal_by_crc == 0


class _DetectionModel(torch.nn.Module):  # stands in for a pickled ultralytics.nn.tasks.DetectionModel
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4)


def test_an_ultralytics_checkpoint_against_its_safetensors_export(tmp_path):
    from ckpttools.commands.convert import convert

    src = tmp_path / "epoch1.pt"
    torch.save(
        {
            "epoch": 1,
            "model": None,
            "ema": _DetectionModel(),
            "updates": 10,
            "train_args": {"batch": 16},
            "date": "2026-01-01",
        },
        src,
    )  # as Ultralytics saves it: the weights live in the pickled EMA model
    out = tmp_path / "epoch1.safetensors"
    convert(src, out)
    report = diff_checkpoints(src, out)
    assert report.verdict == "identical" and report.same == 7 and not report.only_in_a and not report.only_in_b
