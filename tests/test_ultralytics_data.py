"""Ultralytics' dataset YAML read as Ultralytics reads it (its genuine label cache is tested in
tests/test_ultralytics.py): folders, .txt lists with "./" lines, a relative `path` under its datasets_dir."""

from __future__ import annotations

import json

from ckpttools.datasets.ultralytics_data import content_fingerprint, label_path, load_ultralytics_yaml


def _dataset(root, n=3):
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            (root / "images" / split / f"{i}.jpg").write_bytes(b"jpg")
            (root / "labels" / split / f"{i}.txt").write_text(f"0 0.5 0.5 0.{i + 1} 0.2\n")


def test_folders_lists_and_a_relative_path_under_datasets_dir(tmp_path, monkeypatch):
    datasets = tmp_path / "datasets"
    _dataset(datasets / "toy")
    config = tmp_path / "config"
    config.mkdir()
    (config / "settings.json").write_text(json.dumps({"datasets_dir": str(datasets)}))
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(config))
    (datasets / "toy" / "train.txt").write_text("./images/train/0.jpg\n./images/train/2.jpg\n")
    yaml = tmp_path / "yamls" / "toy.yaml"
    yaml.parent.mkdir()
    yaml.write_text("path: toy\ntrain: train.txt\nval: images/val\nnames: [person]\n")
    spec = load_ultralytics_yaml(yaml)
    assert spec.root == (datasets / "toy").resolve()  # Ultralytics' datasets_dir, not the YAML's folder
    assert [p.name for p in spec.splits["train"]] == ["0.jpg", "2.jpg"]  # "./" lines: beside the list
    assert len(spec.splits["val"]) == 3
    assert label_path(spec.splits["train"][0]) == datasets / "toy" / "labels" / "train" / "0.txt"
    before = content_fingerprint(spec)
    (datasets / "toy" / "labels" / "train" / "2.txt").write_text("0 0.5 0.5 0.9 0.2\n")
    assert content_fingerprint(load_ultralytics_yaml(yaml)) != before
    (datasets / "toy" / "labels" / "train" / "2.txt").write_text("0 0.5 0.5 0.3 0.2\n")
    assert content_fingerprint(load_ultralytics_yaml(yaml)) == before  # the same rows: the same content
