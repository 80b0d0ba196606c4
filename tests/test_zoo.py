"""Verdicts on checkpoints written by the real libraries (fixtures/zoo, made by fixtures/make_zoo.py with
torch, timm, transformers, accelerate and lightning; versions in fixtures/zoo/manifest.json): no error on any
genuine file, the layout named, the facts right, diff of consecutive saves, folders in every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckpttools.cli import main as ckpt
from ckpttools.layouts import markdown_table

ZOO = Path(__file__).resolve().parents[1] / "fixtures" / "zoo"
MANIFEST = json.loads((ZOO / "manifest.json").read_text())


def run(*args: str):
    return CliRunner().invoke(ckpt, [*args], env={"COLUMNS": "200"})


def test_the_zoo_covers_every_library_and_the_docs_name_their_versions():
    assert {e["library"] for e in MANIFEST.values()} == {"torch", "timm", "transformers", "accelerate", "lightning"}
    docs = (ZOO.parents[1] / "docs" / "layouts.md").read_text()
    assert docs.startswith(markdown_table())
    for entry in MANIFEST.values():
        assert f"{entry['library']} {entry['version']}" in docs


@pytest.mark.parametrize("command", ["verify", "inspect"])
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_genuine_entry_reads_without_error_with_its_layout_and_parameter_count(name, command):
    entry = MANIFEST[name]
    result = run(command, str(ZOO / name), "--json")
    out = json.loads(result.output)
    errors = [f for f in out.get("findings", []) if f["severity"] == "error"]
    assert result.exit_code == 0 and not errors, (result.output[:500], errors)
    assert out["layout"] == entry["layout"]
    if entry.get("parameters") is not None:
        assert out["parameter_count"] == entry["parameters"]


def test_an_archive_of_another_kind_is_declined_not_called_damaged(tmp_path):
    import zipfile

    keras = tmp_path / "model.keras"  # the records a Keras 3 archive holds (no Keras here to write a real one)
    with zipfile.ZipFile(keras, "w") as z:
        z.writestr("metadata.json", "{}")
        z.writestr("config.json", "{}")
        z.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    for command in ("verify", "inspect"):
        result = run(command, str(keras))
        assert result.exit_code == 2 and "Keras" in result.output
        assert "damaged" not in result.output and "lost" not in result.output


def _findings(name: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in json.loads(run("verify", str(ZOO / name), "--json").output)["findings"]:
        out.setdefault(f["code"], []).append(f)
    return out


def test_facts_of_particular_writers():
    assert "keys.prefix" in _findings("ddp_generic.pt")  # the DDP prefix of a generic dict is reported
    assert "optimizer.partial" in _findings("frozen_backbone.pt")  # frozen backbone: info, not an error
    assert "zip.crc-not-computed" in _findings("no_crc32.pt")
    assert "layout.torchscript" in _findings("torchscript.pt")
    lightning = json.loads(run("verify", str(ZOO / "lightning_epoch1.ckpt"), "--json").output)
    assert lightning["ok"] and lightning["step"] == 4  # its callback state holds kth_value = inf: not an error
    steps = [
        json.loads(run("verify", str(ZOO / f"hf_trainer_checkpoint-{n}"), "--json").output)["step"] for n in (1, 2)
    ]
    assert steps == [1, 2]  # from trainer_state.json


@pytest.mark.parametrize(
    "a,b",
    [
        ("torch_tutorial_epoch1.pt", "torch_tutorial_epoch2.pt"),
        ("timm_checkpoint-0.pth.tar", "timm_checkpoint-1.pth.tar"),
        ("lightning_epoch0.ckpt", "lightning_epoch1.ckpt"),
        ("hf_trainer_checkpoint-1", "hf_trainer_checkpoint-2"),
    ],
)
def test_diff_of_consecutive_saves(a, b):
    result = run("diff", str(ZOO / a), str(ZOO / b), "--json")
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["verdict"] == "different"  # trained between the saves
    assert run("diff", str(ZOO / a), str(ZOO / a), "--json").exit_code == 0


def test_a_sharded_folder_is_one_checkpoint_for_inspect_diff_and_convert(tmp_path):
    assert (
        json.loads(run("diff", str(ZOO / "hf_sharded"), str(ZOO / "hf_pretrained"), "--json").output)["verdict"]
        == "identical"
    )
    out = tmp_path / "one.safetensors"
    assert run("convert", str(ZOO / "hf_sharded"), str(out)).exit_code == 0
    assert json.loads(run("diff", str(out), str(ZOO / "hf_pretrained"), "--json").output)["verdict"] == "identical"


def test_a_pt2_archive_lists_its_weights_and_a_flipped_bit_in_one_is_found(tmp_path):
    import zipfile

    summary = json.loads(run("inspect", str(ZOO / "exported.pt2"), "--json").output)
    assert summary["layout"] == "torch-export" and summary["weights_key"] == "weights"
    data = bytearray((ZOO / "exported.pt2").read_bytes())
    with zipfile.ZipFile(ZOO / "exported.pt2") as z:
        info = z.getinfo("exported/data/weights/weight_0")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 5] ^= 0x01
    (tmp_path / "bad.pt2").write_bytes(bytes(data))
    report = json.loads(run("verify", str(tmp_path / "bad.pt2"), "--json").output)
    assert not report["ok"] and "zip.crc-mismatch" in {f["code"] for f in report["findings"]}


def test_folders_convert_and_crc0_files_convert(tmp_path):
    out = tmp_path / "hf.safetensors"
    assert run("convert", str(ZOO / "hf_trainer_checkpoint-2"), str(out)).exit_code == 0
    same = json.loads(run("diff", str(ZOO / "hf_trainer_checkpoint-2"), str(out), "--json").output)
    assert same["verdict"] == "identical"
    plain = tmp_path / "no_crc.pt"
    assert run("convert", str(ZOO / "no_crc32.pt"), str(plain), "--to", "pt").exit_code == 0
    assert run("verify", str(plain)).exit_code == 0
