"""Published dataset layouts: reading, pairing, splits, 16-bit infrared, `data check` on clean and broken copies,
`data import`.  The datasets are written by fixtures/make_datasets.py in each layout as published."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import make_datasets as M  # noqa: E402

from ckpttools.datasets.index import detect_layout  # noqa: E402
from ckpttools.datasets.layouts import BY_NAME, markdown_table  # noqa: E402
from ckpttools.datasets.spec import DatasetError, load_data_spec  # noqa: E402
from ckpttools.datasets.survey import load_split  # noqa: E402
from fuse_train.cli import cli  # noqa: E402
from fuse_train.data.demo import make_scene  # noqa: E402
from fuse_train.data.pairs import read_image, scale_to_8bit  # noqa: E402

PUBLISHED = ("llvip", "m3fd", "flir-aligned", "kaist", "kaist-voc", "voc-pairs", "coco-pairs")
BREAKABLE = ("llvip", "m3fd", "flir-aligned", "kaist-voc", "voc-pairs")


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layouts")
    for layout in M.LAYOUT_NAMES:
        M.write_layout(out, layout)
    return out


def _data_arg(datasets: Path, layout: str) -> Path:
    return datasets / layout / "data.yaml" if layout == "yolofuse" else datasets / layout


def test_every_layout_row_is_well_formed():
    from ckpttools.datasets.layouts import LABEL_FORMATS, LAYOUTS, SPLIT_RULES, template_regex

    for x in LAYOUTS:
        assert x.label_format in LABEL_FORMATS and x.split in SPLIT_RULES, x.name
        rgb, ir = template_regex(x.rgb), template_regex(x.ir)
        assert set(rgb.groupindex) == set(ir.groupindex) and "id" in rgb.groupindex, x.name  # partners by fields
        assert ("split" in rgb.groupindex) == (x.split == "folder"), x.name
        assert x.markers and (x.split != "list" or x.split_values), x.name


def test_docs_table_is_generated_from_the_layouts():
    assert (Path(__file__).parents[1] / "docs" / "datasets.md").read_text().startswith(markdown_table())


@pytest.mark.parametrize("layout", PUBLISHED)
def test_each_layout_is_detected_and_read_with_the_generators_boxes(datasets, layout):
    root = datasets / layout
    assert detect_layout(root).name == layout
    spec = load_data_spec(root)
    assert spec.layout == layout
    if BY_NAME[layout].classes:
        assert tuple(spec.names.values()) == BY_NAME[layout].classes
    pairs, labels = [], []
    for split in ("train", "val"):
        data = load_split(spec, split)
        pairs += data.pairs
        labels += data.labels
    assert len(pairs) == sum(len(ids) for _, ids in M.FRAMES[layout])
    # every frame's boxes are the scene's boxes (VOC / bbGt round to whole pixels: within 1 px of 64)
    by_seed = {}
    n = 0
    for tag, ids in M.FRAMES[layout]:
        for frame in ids:
            by_seed[tag, frame] = make_scene(n, 64)[2]
            n += 1
    for (rgb, ir), rows in zip(pairs, labels):
        (key,) = [
            (t, f)
            for t, f in by_seed
            if f in rgb.name and (t in str(rgb) or len({x for x, _ in by_seed}) == 1 or layout == "flir-aligned")
        ]
        expected = np.array([r[1:] for r in by_seed[key]], np.float32).reshape(-1, 4)
        assert rows.shape[0] == len(expected), rgb
        if len(expected):
            assert np.abs(np.sort(rows[:, 1:], 0) - np.sort(expected, 0)).max() <= 1.5 / 64, rgb
        assert rgb.exists() and ir.exists() and rgb != ir


def test_published_splits_and_kaist_rules(datasets):
    llvip = load_data_spec(datasets / "llvip")
    assert all("/test/" in str(rgb) for rgb, _ in load_split(llvip, "val").pairs)  # LLVIP validates on test
    flir = load_data_spec(datasets / "flir-aligned")
    assert {rgb.name for rgb, _ in load_split(flir, "val").pairs} == {
        f"FLIR_{i:05d}_RGB.jpg" for i in range(8863, 8867)
    }
    kaist = load_data_spec(datasets / "kaist")
    assert all("set06" in str(rgb) for rgb, _ in load_split(kaist, "val").pairs)
    # 'person?' lines are skipped, so KAIST-txt and KAIST-VOC (no such lines) give the same boxes
    voc = load_data_spec(datasets / "kaist-voc")
    for a, b in zip(load_split(kaist, "train").labels, load_split(voc, "train").labels):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1.5 / 64  # bbGt rounds x y w h, VOC the corners


def test_sequence_split_keeps_recordings_whole_and_follows_the_seed(datasets, tmp_path):
    spec = load_data_spec(datasets / "m3fd")
    val = {rgb.stem for rgb, _ in load_split(spec, "val").pairs}
    runs = [{f"{i:05d}" for i in range(0, 6)}, {f"{i:05d}" for i in range(100, 106)}]
    assert val in runs  # one whole recording, never a mix
    seeds = set()
    for seed in range(6):
        (tmp_path / f"s{seed}.yaml").write_text(f"layout: m3fd\npath: {datasets / 'm3fd'}\nsplit_seed: {seed}\n")
        seeds.add(frozenset(rgb.stem for rgb, _ in load_split(load_data_spec(tmp_path / f"s{seed}.yaml"), "val").pairs))
    assert len(seeds) == 2  # the seed picks which recording validates
    (tmp_path / "one.yaml").write_text(f"layout: m3fd\npath: {datasets / 'm3fd'}\nsplit_block: 1000\n")
    with pytest.raises(DatasetError, match="too few recordings"):
        load_split(load_data_spec(tmp_path / "one.yaml"), "val")


def test_16bit_infrared_is_scaled_not_truncated(datasets):
    path = datasets / "voc-pairs" / "ir" / "0001.png"
    with Image.open(path) as im:
        assert im.mode.startswith("I")
        raw = np.asarray(im).astype(np.float32)
    assert raw.max() > 255  # real 16-bit content
    out = read_image(path, "L")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert np.unique(out).size > 50  # the scene survives (truncation to 8 bits would saturate it)
    fixed = read_image(path, "L", "range:7000:13120")
    assert np.array_equal(fixed, scale_to_8bit(raw, "range:7000:13120"))
    assert np.array_equal(fixed, np.clip(np.round((raw - 7000) * 255 / 6120), 0, 255).astype(np.uint8))
    ir8 = np.asarray(Image.open(datasets / "coco-pairs" / "ir" / "frame_0001.jpg"))
    assert np.array_equal(read_image(datasets / "coco-pairs" / "ir" / "frame_0001.jpg", "L"), ir8)  # 8-bit untouched


@pytest.mark.parametrize("layout", PUBLISHED + ("yolofuse",))
def test_data_check_is_clean_on_every_clean_layout(datasets, layout):
    result = CliRunner().invoke(cli, ["data", "check", str(_data_arg(datasets, layout)), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["layout"] == layout and report["problems"] == []
    assert sum(report["pairs"].values()) == sum(len(ids) for _, ids in M.FRAMES[layout])
    assert report["sizes"]["rgb"] == {"64x64": sum(report["pairs"].values())}


@pytest.mark.parametrize("layout", BREAKABLE)
def test_data_check_names_every_planted_defect_and_nothing_else(datasets, tmp_path, layout):
    planted = M.break_copy(datasets / layout, tmp_path / layout, layout)
    result = CliRunner().invoke(cli, ["data", "check", str(tmp_path / layout), "--json"])
    assert result.exit_code == 1, result.output
    found = [(p["kind"], Path(p["path"]).name) for p in json.loads(result.output)["problems"]]
    assert sorted(found) == sorted(planted)
    text = CliRunner().invoke(cli, ["data", "check", str(tmp_path / layout)]).output
    for kind, name in planted:
        assert kind in text and name in text
    with pytest.raises(DatasetError, match="problem"):  # training refuses it, naming the first problem
        load_split(load_data_spec(tmp_path / layout), "train")


def test_data_check_names_yolo_label_and_coco_problems(datasets, tmp_path):
    import shutil

    root = shutil.copytree(datasets / "yolofuse", tmp_path / "y")
    (root / "data.yaml").write_text((root / "data.yaml").read_text().replace(str(datasets / "yolofuse"), str(root)))
    (root / "labels" / "train" / "00001.txt").write_text("3 0.5 0.5 0.1 0.1\n0 0.5\n")
    (root / "imagesIR" / "val" / "00009.png").unlink()
    result = CliRunner().invoke(cli, ["data", "check", str(root / "data.yaml"), "--json"])
    assert result.exit_code == 1
    messages = [p["message"] for p in json.loads(result.output)["problems"]]
    assert any("00001.txt:1: class 3 is not an integer in 0..0" in m for m in messages)
    assert any("00001.txt:2: expected 5 fields" in m for m in messages)
    assert any("00009.png: no infrared partner" in m for m in messages)
    assert len(messages) == 3
    coco = shutil.copytree(datasets / "coco-pairs", tmp_path / "c")
    doc = json.loads((coco / "annotations.json").read_text())
    doc["annotations"][0]["category_id"] = 99
    doc["categories"].append({"id": 2, "name": "dog"})
    doc["annotations"][1]["category_id"] = 2
    (coco / "annotations.json").write_text(json.dumps(doc))
    problems = json.loads(CliRunner().invoke(cli, ["data", "check", str(coco), "--json"]).output)["problems"]
    assert len(problems) == 1 and "needs image_id, category_id and bbox" in problems[0]["message"]
    # KAIST's bbGt text: a missing header and a short line are named with their line numbers
    kaist = shutil.copytree(datasets / "kaist", tmp_path / "k")
    (kaist / "annotations" / "set00" / "V000" / "I00001.txt").write_text("person 1 2 3 4 0\n")
    (kaist / "annotations" / "set00" / "V000" / "I00002.txt").write_text("% bbGt version=3\nperson 10 12\n")
    messages = [
        p["message"]
        for p in json.loads(CliRunner().invoke(cli, ["data", "check", str(kaist), "--json"]).output)["problems"]
    ]
    assert len(messages) == 2
    assert "I00001.txt:1: expected the '% bbGt version=3' header" in messages[0]
    assert "I00002.txt:2: expected 'label left top width height ...'" in messages[1]
    # a name outside a layout's published class list is named (M3FD has six classes, no 'Dog')
    m3fd = shutil.copytree(datasets / "m3fd", tmp_path / "m")
    xml = m3fd / "Annotation" / "00000.xml"
    xml.write_text(xml.read_text().replace("<name>People</name>", "<name>Dog</name>", 1))
    problems = json.loads(CliRunner().invoke(cli, ["data", "check", str(m3fd), "--json"]).output)["problems"]
    assert [p["kind"] for p in problems] == ["class"] and "'Dog'" in problems[0]["message"]


def test_data_check_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["data", "check", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "not a dataset layout fuse-train knows" in result.output and "Traceback" not in result.output


def test_import_writes_the_yolofuse_layout_with_symlinks_and_the_same_labels(datasets, tmp_path):
    out = tmp_path / "kaist-fuse"
    result = CliRunner().invoke(cli, ["data", "import", "kaist", str(datasets / "kaist"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    imported = load_data_spec(out / "data.yaml")
    assert imported.layout == "yolofuse" and imported.names == {0: "person"}
    direct = load_data_spec(datasets / "kaist")
    for split in ("train", "val"):
        a, b = load_split(direct, split), load_split(imported, split)
        assert [rgb.resolve() for rgb, _ in a.pairs] == [rgb.resolve() for rgb, _ in b.pairs]
        assert all(rgb.is_symlink() and ir.is_symlink() for rgb, ir in b.pairs)
        for x, y in zip(a.labels, b.labels):
            assert np.allclose(x, y, atol=1e-6)
    assert {p.name for p, _ in load_split(imported, "train").pairs} >= {"set00_V000_I00000.jpg"}
    # an existing output is never overwritten; --copy writes real files
    again = CliRunner().invoke(cli, ["data", "import", "kaist", str(datasets / "kaist"), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    copied = tmp_path / "copied"
    assert (
        CliRunner()
        .invoke(
            cli,
            ["data", "import", "auto", str(datasets / "m3fd"), "-o", str(copied), "--copy", "--val-fraction", "0.4"],
        )
        .exit_code
        == 0
    )
    pairs = load_split(load_data_spec(copied / "data.yaml"), "train").pairs
    assert pairs and not any(p.is_symlink() for pair in pairs for p in pair)


def test_import_leaves_out_broken_pairs_and_names_them(datasets, tmp_path):
    planted = M.break_copy(datasets / "llvip", tmp_path / "broken", "llvip")
    result = CliRunner().invoke(cli, ["data", "import", "llvip", str(tmp_path / "broken"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    for _, name in planted:
        assert name in result.output
    spec = load_data_spec(tmp_path / "o" / "data.yaml")
    assert len(load_split(spec, "train").pairs) == 8 - len(planted)
