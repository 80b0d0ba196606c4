import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ckpttools.datasets.annotations import parse_yolo
from ckpttools.datasets.spec import DatasetError, ir_folder_for, load_data_spec
from fuse_train.data.demo import make_scene, write_demo
from fuse_train.data.pairs import Augment, PairedDataset, collate, warp


def _copy(tiny_data: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(tiny_data.parent, dst)
    spec = yaml.safe_load((dst / "data.yaml").read_text())
    spec["path"] = str(dst)
    (dst / "data.yaml").write_text(yaml.safe_dump(spec))
    return dst


def test_ir_folder_replaces_only_the_images_component():
    assert ir_folder_for(Path("/d/my_images/images/train")) == Path("/d/my_images/imagesIR/train")
    assert ir_folder_for(Path("/images/x/images/val")) == Path("/images/x/imagesIR/val")
    with pytest.raises(DatasetError, match="no path component named 'images'"):
        ir_folder_for(Path("/d/images_rgb/train"))


def test_data_yaml_relative_path_and_explicit_ir(tmp_path, tiny_data):
    root = _copy(tiny_data, tmp_path)
    (root / "thermal").mkdir()
    shutil.move(str(root / "imagesIR" / "train"), root / "thermal" / "train")
    (root / "sub").mkdir()
    (root / "sub" / "d.yaml").write_text(
        yaml.safe_dump(
            {
                "path": "..",
                "train": "images/train",
                "val": "images/val",
                "train_ir": "thermal/train",
                "names": ["person"],
            }
        )
    )
    spec = load_data_spec(root / "sub" / "d.yaml")
    assert spec.root == root.resolve()
    assert spec.train_ir == (root / "thermal" / "train").resolve()
    assert spec.val_ir == (root / "imagesIR" / "val").resolve()
    assert spec.names == {0: "person"}


@pytest.mark.parametrize(
    "line, message",
    [
        ("0 0.5 0.5 0.1", "expected 5 fields"),
        ("0 0.5 0.5 0.1 x", "not a number"),
        ("3 0.5 0.5 0.1 0.1", "class 3 is not an integer in 0..0"),
        ("0 1.5 0.5 0.1 0.1", "normalised"),
        ("0 0.5 0.5 0 0.1", "positive"),
    ],
)
def test_malformed_label_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "a.txt"
    path.write_text("0 0.5 0.5 0.2 0.2\n" + line + "\n")
    problems = parse_yolo(path, nc=1).problems
    assert len(problems) == 1 and message in problems[0] and problems[0].startswith(f"{path}:2")


def test_missing_ir_partner_is_named(tmp_path, tiny_data):
    root = _copy(tiny_data, tmp_path)
    (root / "imagesIR" / "train" / "00003.png").unlink()
    spec = load_data_spec(root / "data.yaml")
    with pytest.raises(DatasetError, match=r"00003\.png: no infrared partner"):
        PairedDataset.from_spec(spec, "train", 64)


def test_unreadable_image_is_named(tmp_path, tiny_data):
    root = _copy(tiny_data, tmp_path)
    (root / "images" / "train" / "00002.png").write_bytes(b"not a png")
    spec = load_data_spec(root / "data.yaml")
    with pytest.raises(DatasetError, match=r"00002\.png: unreadable image"):  # found up front, from its header
        PairedDataset.from_spec(spec, "train", 64)
    good = root / "images" / "train" / "00003.png"
    (root / "images" / "train" / "00002.png").write_bytes(good.read_bytes()[:120])  # a header, then the data cut
    ds = PairedDataset.from_spec(load_data_spec(root / "data.yaml"), "train", 64)  # afresh: a spec is surveyed once
    with pytest.raises(DatasetError, match=r"00002\.png: unreadable image"):  # found when decoded
        ds[2]


def test_missing_data_yaml_and_keys(tmp_path):
    with pytest.raises(DatasetError, match="data file not found"):
        load_data_spec(tmp_path / "nope.yaml")
    (tmp_path / "d.yaml").write_text("path: .\ntrain: images/train\n")
    with pytest.raises(DatasetError, match="missing key"):
        load_data_spec(tmp_path / "d.yaml")


def test_three_channel_ir_is_used_as_one_channel(tmp_path, tiny_data):
    root = _copy(tiny_data, tmp_path)
    ir_path = root / "imagesIR" / "train" / "00000.png"
    ir = np.asarray(Image.open(ir_path))
    Image.fromarray(np.stack([ir] * 3, -1)).save(ir_path)
    spec = load_data_spec(root / "data.yaml")
    image, _, _ = PairedDataset.from_spec(spec, "train", 64)[0]
    assert image.shape == (4, 64, 64)
    assert torch.equal(image[3], torch.from_numpy(np.array(ir)))


def _box_scene(size=96):
    """RGB and IR each hold the same bright rectangle at the label's place."""
    rgb = np.zeros((size, size + 32, 3), np.uint8)
    ir = np.zeros((size, size + 32), np.uint8)
    x1, y1, x2, y2 = 20, 30, 50, 70
    rgb[y1:y2, x1:x2] = 255
    ir[y1:y2, x1:x2] = 255
    w, h = size + 32, size
    label = np.array([[0, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]], np.float32)
    return rgb, ir, label


@pytest.mark.parametrize("seed", range(8))
def test_paired_augmentation_keeps_boxes_aligned_in_both_modalities(seed):
    rgb, ir, label = _box_scene()
    image = torch.from_numpy(np.concatenate([rgb, ir[..., None]], 2)).permute(2, 0, 1).float() / 255
    out, boxes, keep = warp(image, label, 64, Augment(flip=0.5, scale=0.3, translate=0.1), np.random.default_rng(seed))
    assert keep.all()
    # identical geometry: every RGB channel equals the IR channel pixel for pixel
    for c in range(3):
        assert torch.allclose(out[c], out[3], atol=1e-6)
    x1, y1, x2, y2 = boxes[0]
    bright = out[3] > 0.75
    ys, xs = np.nonzero(bright.numpy())
    # the bright region sits exactly inside the transformed box (within a pixel of interpolation)
    assert xs.min() >= x1 - 1 and xs.max() <= x2 + 1 and ys.min() >= y1 - 1 and ys.max() <= y2 + 1
    assert xs.min() <= x1 + 1.5 and xs.max() >= x2 - 2.5 and ys.min() <= y1 + 1.5 and ys.max() >= y2 - 2.5


def test_augmentation_depends_only_on_seed_epoch_index(tiny_data):
    spec = load_data_spec(tiny_data)
    ds = PairedDataset.from_spec(spec, "train", 64, Augment(), seed=3)
    a, la, _ = ds[(2, 5)]
    ds[(0, 1)]  # another sample in between changes nothing
    b, lb, _ = ds[(2, 5)]
    c, _, _ = ds[(3, 5)]
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_photometric_jitter_is_per_modality(tiny_data):
    spec = load_data_spec(tiny_data)
    ds = PairedDataset.from_spec(spec, "train", 64, Augment(flip=0, scale=0, translate=0), seed=0)
    plain = PairedDataset.from_spec(spec, "train", 64)
    ratios = []
    for i in range(6):
        aug, _, _ = ds[(0, i)]
        ref, _, _ = plain[i]
        ratios.append(
            (aug[:3].float().mean() / ref[:3].float().mean() - aug[3].float().mean() / ref[3].float().mean()).abs()
        )
    assert max(ratios) > 0.05  # RGB and IR gains drawn independently


def test_collate_prefixes_image_index():
    a = (torch.zeros(4, 8, 8, dtype=torch.uint8), torch.tensor([[0, 1, 1, 3, 3.0]]), 0)
    b = (torch.zeros(4, 8, 8, dtype=torch.uint8), torch.tensor([[0, 2, 2, 5, 5.0], [0, 1, 1, 2, 2.0]]), 1)
    images, labels, idx = collate([a, b])
    assert images.shape == (2, 4, 8, 8)
    assert labels[:, 0].tolist() == [0, 1, 1]


def test_demo_is_deterministic_in_the_yolofuse_layout(tmp_path):
    rgb1, ir1, l1 = make_scene(123, 96)
    rgb2, ir2, l2 = make_scene(123, 96)
    assert np.array_equal(rgb1, rgb2) and np.array_equal(ir1, ir2) and l1 == l2
    data_yaml = write_demo(tmp_path / "d", n_train=4, n_val=2, size=64)
    spec = load_data_spec(data_yaml)
    assert spec.imgsz == 64 and spec.names == {0: "person"}
    assert len(list((tmp_path / "d" / "imagesIR" / "val").glob("*.png"))) == 2
    assert Image.open(tmp_path / "d" / "imagesIR" / "val" / "00000.png").mode == "L"
