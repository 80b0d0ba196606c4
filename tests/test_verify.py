"""ckpt verify / inspect / preflight on real and damaged checkpoints."""

import hashlib
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckpttools import verify
from ckpttools.cli import main as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
from make_corpus import apply, variants  # noqa: E402


def _codes(report):
    return {f.code for f in report.findings}


def _run(args):
    return CliRunner().invoke(ckpt, args)


@pytest.mark.slow
def test_intact_fuse_train_checkpoint_passes(reference_run):
    path = reference_run[0] / "weights" / "last.pt"
    report = verify(path)
    assert report.ok(strict=True), report.findings
    assert (report.format, report.layout) == ("torch-zip", "fuse-train")
    assert report.facts["epoch"] == 2 and report.facts["step"] == 12 and report.facts["parameter_count"] > 1_000_000
    assert "digest" in report.facts


@pytest.mark.slow
def test_corruption_corpus_is_flagged_every_time(reference_run, tmp_path):
    """Every damaged variant of a real fuse-train checkpoint fails verify: truncations, bit flips in tensor
    data, pickle, headers, central directory and end records, zero length, random bytes."""
    src = reference_run[0] / "weights" / "last.pt"
    work = tmp_path / "damaged.pt"
    shutil.copyfile(src, work)
    missed, kinds = [], set()
    for v in variants(src, flips=12, truncations=12, seed=1):
        kinds.add(v["kind"])
        if "flip" in v:  # flip in place and restore: no 70 MB copy per variant
            offset, bit = v["flip"]
            with open(work, "r+b") as f:
                f.seek(offset)
                byte = f.read(1)[0]
                f.seek(offset)
                f.write(bytes([byte ^ (1 << bit)]))
            ok = verify(work).ok()
            with open(work, "r+b") as f:
                f.seek(offset)
                f.write(bytes([byte]))
        else:
            apply(src, v, tmp_path / "variant.pt")
            ok = verify(tmp_path / "variant.pt").ok()
        if ok:
            missed.append(v["name"])
    assert missed == []
    assert {
        "bit flip in tensor-data",
        "bit flip in pickle",
        "bit flip in central-directory",
        "truncation",
        "zero length",
        "random bytes",
    } <= kinds
    assert verify(work).ok(strict=True)  # restored copy passes again


def test_bit_flip_in_tensor_data_names_the_tensor(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"layer.weight": torch.randn(64, 64), "layer.bias": torch.zeros(64)}, path)
    from ckpttools.formats.ziprecords import parse_zip

    records, _ = parse_zip(path)
    rec = next(r for r in records if r.name.endswith("data/0"))
    data = bytearray(path.read_bytes())
    data[rec.data_offset + 100] ^= 0x10
    path.write_bytes(bytes(data))
    # torch.load does not notice ...
    torch.load(path, weights_only=True)
    # ... verify does, and says which tensor
    report = verify(path)
    crc = [f for f in report.findings if f.code == "zip.crc-mismatch"]
    assert crc and "layer.weight" in crc[0].where


@pytest.mark.parametrize(
    "content, what",
    [
        (b"", "empty file"),
        (bytes(range(256)) * 40, "not a known checkpoint"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "PNG image"),
        (b"hello world\n", "text file"),
    ],
)
def test_non_checkpoints_are_findings_not_tracebacks(tmp_path, content, what):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    result = _run(["verify", "--json", str(path)])
    assert result.exit_code == 2  # not a checkpoint: 2, as in every other command (README: Exit codes)
    report = json.loads(result.output)
    assert report["ok"] is False and what in report["findings"][0]["message"]
    assert "Traceback" not in result.output


def test_folder_without_metadata_and_missing_path(tmp_path):
    result = _run(["verify", "--json", str(tmp_path)])
    assert result.exit_code == 2 and "not a torch.distributed.checkpoint folder" in result.output
    result = _run(["verify", str(tmp_path / "nope.pt")])
    assert result.exit_code == 2 and "no such file" in result.output and "Traceback" not in result.output


def test_json_has_the_documented_fields(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(3)}, path)
    report = json.loads(_run(["verify", "--json", str(path)]).output)
    assert {"path", "ok", "format", "layout", "findings", "parameter_count"} <= report.keys()
    assert report["ok"] is True and report["layout"] == "state-dict" and report["parameter_count"] == 3


def test_prefix_warning_and_strict(tmp_path):
    path = tmp_path / "ddp.pt"
    torch.save({"module.conv.weight": torch.ones(2, 2), "module.conv.bias": torch.ones(2)}, path)
    report = verify(path)
    assert "keys.prefix" in _codes(report) and report.ok() and not report.ok(strict=True)
    assert _run(["verify", str(path)]).exit_code == 0
    result = _run(["verify", "--strict", str(path)])
    assert result.exit_code == 1 and "ckpt repair" in result.output


def test_nan_in_weights_is_an_error_naming_the_tensor(tmp_path):
    path = tmp_path / "nan.pt"
    w = torch.ones(10, dtype=torch.bfloat16)
    w[3] = float("nan")
    torch.save({"a.weight": torch.ones(4), "b.weight": w, "c": torch.tensor([float("inf")], dtype=torch.float16)}, path)
    findings = [f for f in verify(path).findings if f.code == "values.nonfinite"]
    assert {f.where for f in findings} == {"b.weight", "c"}


def test_digest_detects_a_rewritten_checkpoint(tmp_path):
    from ckpttools.digest import digest_record

    good = {"format": "x", "model": {"w": torch.arange(6.0)}, "epoch": 1}
    good["digest"] = digest_record(good)
    torch.save(good, tmp_path / "good.pt")
    assert "digest" in verify(tmp_path / "good.pt").facts and verify(tmp_path / "good.pt").ok()
    bad = dict(good, model={"w": torch.arange(6.0) * 2})  # valid zip, valid CRCs, stale digest
    torch.save(bad, tmp_path / "bad.pt")
    assert "digest.mismatch" in _codes(verify(tmp_path / "bad.pt"))


def test_lightning_optimizer_state_against_parameters(tmp_path):
    sd = {"net.weight": torch.ones(4, 3), "net.bias": torch.ones(4)}
    state = {
        0: {"exp_avg": torch.zeros(4, 3), "exp_avg_sq": torch.zeros(4, 3), "step": torch.tensor(1.0)},
        1: {"exp_avg": torch.zeros(5), "exp_avg_sq": torch.zeros(5), "step": torch.tensor(1.0)},
    }
    ckpt_dict = {
        "state_dict": sd,
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.4.0",
        "optimizer_states": [{"state": state, "param_groups": [{"params": [0, 1], "lr": 0.1}]}],
    }
    torch.save(ckpt_dict, tmp_path / "l.ckpt")
    report = verify(tmp_path / "l.ckpt")
    assert report.layout == "lightning" and "optimizer.shape-mismatch" in _codes(report)
    state[1]["exp_avg"] = torch.zeros(4)
    torch.save(ckpt_dict, tmp_path / "ok.ckpt")
    assert verify(tmp_path / "ok.ckpt").ok()
    ckpt_dict["optimizer_states"][0]["param_groups"][0]["params"] = [0, 1, 2]
    torch.save(ckpt_dict, tmp_path / "count.ckpt")
    assert "optimizer.param-count" in _codes(verify(tmp_path / "count.ckpt"))


def test_other_containers(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(3, 4), "b": torch.zeros(4)}, tmp_path / "m.safetensors", metadata={"epoch": "3"})
    report = verify(tmp_path / "m.safetensors")
    assert report.format == "safetensors" and report.ok() and report.facts["parameter_count"] == 16
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    assert "safetensors.truncated" in _codes(verify(tmp_path / "cut.safetensors"))
    torch.save({"w": torch.arange(5.0)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    report = verify(tmp_path / "legacy.pt")
    assert report.format == "torch-legacy" and report.ok(), report.findings
    (tmp_path / "p.pkl").write_bytes(pickle.dumps({"weights": np.ones(3), "epoch": 2}))
    report = verify(tmp_path / "p.pkl")
    assert report.format == "pickle" and report.ok()


def test_zip_top_folder_name_is_arbitrary(tmp_path):
    path = tmp_path / "weird name.pt"
    torch.save({"w": torch.ones(2)}, path)
    data = path.read_bytes().replace(b"weird name/", b"zzzzzzzzzz/")
    (tmp_path / "renamed.pt").write_bytes(data)
    report = verify(tmp_path / "renamed.pt")
    assert report.ok(), report.findings


def test_verify_never_modifies_the_input(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(3)}, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns
    _run(["verify", str(path)])
    _run(["inspect", "--json", str(path)])
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == before


@pytest.mark.slow
def test_inspect_summarises_a_fuse_train_checkpoint(reference_run):
    path = reference_run[0] / "weights" / "last.pt"
    summary = json.loads(_run(["inspect", "--json", str(path)]).output)
    assert summary["layout"] == "fuse-train" and summary["epoch"] == 2 and summary["step"] == 12
    assert summary["run_arguments"]["batch"] == 4 and summary["devices"] == {"cpu": summary["tensors"]}
    assert "model" in summary["keys"] and summary["bytes_by_dtype"]["float32"] > 0
    human = _run(["inspect", str(path)])
    assert human.exit_code == 0 and "fuse-train" in human.output and "run arguments" in human.output


@pytest.mark.slow
def test_ckpt_preflight_blocks_and_allows(reference_run, tiny_data):
    path = str(reference_run[0] / "weights" / "last.pt")
    assert _run(["preflight", path, "--data", str(tiny_data), "--batch", "4"]).exit_code == 0
    blocked = _run(["preflight", path, "--batch", "8", "--lr0", "0.1"])
    assert blocked.exit_code == 3 and "--allow-change batch,lr0" in blocked.output
    assert _run(["preflight", path, "--batch", "8", "--allow-change", "batch"]).exit_code == 0
    report = json.loads(_run(["preflight", "--json", path, "--world-size", "2"]).output)
    assert report["blocked"] == ["world-size"]
    assert _run(["preflight", path, "--allow-change", "bogus"]).exit_code == 2


def test_version_and_help():
    assert _run(["--version"]).output.strip().endswith("0.1.0")
    for command in ("verify", "inspect", "preflight"):
        result = _run([command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_findings_page_is_generated_from_the_registry_and_unknown_codes_are_refused():
    from ckpttools.findings import markdown
    from ckpttools.report import Report

    root = Path(__file__).resolve().parent.parent
    assert (root / "docs" / "findings.md").read_text() == markdown(), (
        "regenerate: python -m ckpttools.findings > docs/findings.md"
    )
    with pytest.raises(ValueError, match="not in ckpttools.findings"):
        Report("x").add("error", "zip.made-up", "a code nobody documented")


def test_dcp_folder_is_read_without_torch_distributed(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}, "epoch": 3}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "ck"))
    report = verify(tmp_path / "ck")
    assert (report.format, report.layout) == ("dcp", "dcp") and report.ok(strict=True), report.findings
    assert report.facts["parameter_count"] == 9
    summary = json.loads(_run(["inspect", "--json", str(tmp_path / "ck")]).output)
    assert summary["keys"]["epoch"] == "3" and "2 tensors" in summary["keys"]["model"]
    # damage one tensor's bytes inside a .distcp file: found by the embedded record's CRC32
    distcp = next((tmp_path / "ck").glob("*.distcp"))
    data = bytearray(distcp.read_bytes())
    at = data.find(torch.arange(6.0).numpy().tobytes())
    data[at + 5] ^= 0x01
    distcp.write_bytes(bytes(data))
    assert "zip.crc-mismatch" in _codes(verify(tmp_path / "ck"))
    distcp.unlink()
    assert "dcp.file-missing" in _codes(verify(tmp_path / "ck"))


def test_hdf5_is_described_and_checksums_are_checked(tmp_path):
    import h5py

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_group("model").create_dataset("w", data=w, fletcher32=True, chunks=True)
        f["model"].create_dataset("b", data=np.zeros(4, np.uint16)).attrs["dtype"] = "bfloat16"
        f.attrs["epoch"] = 3
    report = verify(tmp_path / "c.h5")
    assert report.format == "hdf5" and report.ok() and report.facts["parameter_count"] == 16
    data = bytearray((tmp_path / "c.h5").read_bytes())
    data[data.find(w.tobytes()[16:32]) + 2] ^= 0x01
    (tmp_path / "bad.h5").write_bytes(bytes(data))
    assert "storage.unreadable" in _codes(verify(tmp_path / "bad.h5"))


def test_hugging_face_style_folder(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text('{"model_type": "yolo"}')
    save_file({"w": torch.ones(2, 2)}, tmp_path / "model.safetensors")
    report = verify(tmp_path)
    assert report.layout == "huggingface" and report.ok() and report.facts["parameter_count"] == 4


def test_a_file_replaced_while_it_is_verified_is_read_again(tmp_path, monkeypatch):
    """A trainer's atomic save can replace last.pt between verify's reads of it; parts of two versions must
    not be judged together (a resume once saw a false digest mismatch this way)."""
    import ckpttools.commands.verify as V

    path, newer = tmp_path / "last.pt", tmp_path / "newer.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, path)
    torch.save({"model": {"w": torch.ones(4)}}, newer)
    real, calls = V._verify, []

    def verify_while_a_writer_replaces(p, report, progress):
        calls.append(p)
        out = real(p, report, progress)
        if len(calls) == 1:
            os.replace(newer, path)  # the writer's rename lands during the first read
        return out

    monkeypatch.setattr(V, "_verify", verify_while_a_writer_replaces)
    report = V.verify(path)
    assert len(calls) == 2 and report.ok() and report.facts["parameter_count"] == 4  # the new file, read whole


def test_a_file_replaced_at_every_read_is_not_verified_and_nothing_mixed_is_reported(tmp_path, monkeypatch):
    """A writer that replaces the file faster than it can be read: each read joins parts of two versions, so
    what those reads found (here a false CRC / digest mismatch at times) is about no file that existed; the
    verdict is one error that says the file was not verified."""
    import ckpttools.commands.verify as V

    path = tmp_path / "last.pt"
    versions = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for n, version in enumerate(versions):
        torch.save({"model": {"w": torch.full((3,), float(n))}}, version)
    os.link(versions[0], path)
    real, calls = V._verify, []

    def verify_while_a_writer_replaces(p, report, progress):
        calls.append(p)
        out = real(p, report, progress)
        tmp = tmp_path / "next.tmp"
        os.link(versions[len(calls) % 2], tmp)
        os.replace(tmp, path)  # a new inode at the path after every read
        return out

    monkeypatch.setattr(V, "_verify", verify_while_a_writer_replaces)
    report = V.verify(path)
    assert len(calls) == V.REREADS + 1
    assert [(f.severity, f.code) for f in report.findings] == [("error", "file.changed-while-reading")]
    assert "not verified" in report.findings[0].message and not report.ok()
