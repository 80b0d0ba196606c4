"""A deterministic synthetic night-scene RGB+IR dataset, the embedded default of ``fuse-train``.

Every scene is dark in RGB and has a thermal (IR) partner of the same size.  Objects come in four kinds,
chosen so that neither modality alone can solve the task:

* person, visible      : clothing colours in RGB (desaturated), warm in IR         -> labelled
* person, dark         : nearly invisible in RGB (background + a few levels), warm  -> labelled
* RGB look-alike       : the same shapes and colours as a visible person, cold IR  -> not labelled
* IR decoy (a heater)  : the same shape and temperature as a person in IR, but a
                         saturated lamp colour in RGB                              -> not labelled

An RGB-only model cannot see the dark persons and cannot tell look-alikes from persons; an IR-only model
cannot tell decoys from persons.  Fused, the evidence is unambiguous.

    python -m fuse_train.data.demo DIR [--train 320 --val 80 --size 128 --seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from ckpttools.atomic import atomic_write

DEMO_VERSION = 2
NAMES = {0: "person"}
PERSON, LOOKALIKE, DECOY = "person", "lookalike", "decoy"


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gx, gy = rng.uniform(-1, 1, 2)
    ramp = gx * xx + gy * yy
    rgb = np.empty((size, size, 3), np.float32)
    base = rng.uniform(14, 30)
    tint = rng.uniform([0.9, 0.95, 1.05], [1.0, 1.05, 1.25])
    for c in range(3):
        rgb[..., c] = base * tint[c] + 8 * ramp + rng.normal(0, 4, (size, size))
    ir = rng.uniform(70, 95) + 18 * ramp + rng.normal(0, 4, (size, size))
    # a few street lights: bright in RGB, lukewarm in IR
    for _ in range(rng.integers(0, 3)):
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size * 0.5), rng.uniform(2, 5)
        blob = np.exp(-((xx * size - cx) ** 2 + (yy * size - cy) ** 2) / (2 * r * r))
        rgb += blob[..., None] * np.array([200, 180, 110])
        ir += blob * 25
    return rgb, ir


def _person_mask(size: int, x0: float, y0: float, w: float, h: float) -> np.ndarray:
    """A soft pedestrian silhouette: head disc over a rounded body, inside box (x0, y0, w, h)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    head_r = 0.16 * h
    head = ((xx - (x0 + w / 2)) / (w * 0.35)) ** 2 + ((yy - (y0 + head_r)) / head_r) ** 2 <= 1.0
    bx = np.abs(xx - (x0 + w / 2)) <= w / 2
    by = (yy >= y0 + 1.8 * head_r) & (yy <= y0 + h)
    return (head | (bx & by)).astype(np.float32)


def _place(rng: np.random.Generator, size: int, taken: list[tuple[float, float, float, float]]):
    for _ in range(50):
        h = rng.uniform(14, 40)
        w = h * rng.uniform(0.35, 0.5)
        x0, y0 = rng.uniform(1, size - w - 1), rng.uniform(size * 0.15, size - h - 1)
        box = (x0, y0, x0 + w, y0 + h)
        if all(box[2] + 2 < t[0] or t[2] + 2 < box[0] or box[3] + 2 < t[1] or t[3] + 2 < box[1] for t in taken):
            taken.append(box)
            return x0, y0, w, h
    return None


def make_scene(
    seed: int, size: int = 128
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, float, float, float, float]]]:
    """One scene: (rgb uint8 HxWx3, ir uint8 HxW, YOLO labels [(cls, cx, cy, w, h) normalised])."""
    rng = np.random.default_rng(seed)
    rgb, ir = _background(rng, size)
    kinds = (
        [PERSON] * int(rng.integers(1, 5)) + [LOOKALIKE] * int(rng.integers(0, 3)) + [DECOY] * int(rng.integers(0, 3))
    )
    rng.shuffle(kinds)
    taken: list = []
    labels = []
    for kind in kinds:
        spot = _place(rng, size, taken)
        if spot is None:
            continue
        x0, y0, w, h = spot
        mask = _person_mask(size, x0, y0, w, h)
        m3 = mask[..., None]
        if kind == DECOY:  # a lamp or heater: saturated colour
            hue = np.zeros(3)
            hue[rng.integers(0, 3)] = rng.uniform(150, 230)
            colour = hue + rng.uniform(0, 30, 3)
        else:  # clothing: desaturated; a dark person is almost background
            grey = rng.uniform(60, 150)
            colour = grey * rng.uniform(0.85, 1.15, 3)
            if kind == PERSON and rng.random() < 0.5:  # dark clothing: the local background, 2 levels up
                colour = None
        if colour is None:
            rgb = rgb + 2.0 * m3
        else:
            texture = rng.normal(0, 6.0, (size, size, 1))
            rgb = rgb * (1 - m3) + (colour + texture) * m3
        if kind in (PERSON, DECOY):
            ir = ir * (1 - mask) + rng.uniform(185, 235) * mask + rng.normal(0, 5, (size, size)) * mask
        else:  # cold look-alike: the IR background shows through, slightly cooler
            ir = ir - 6 * mask
        if kind == PERSON:
            labels.append((0, (x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size))
    rgb8 = np.clip(rgb, 0, 255).round().astype(np.uint8)
    ir8 = np.clip(ir, 0, 255).round().astype(np.uint8)
    return rgb8, ir8, labels


def write_demo(root: str | os.PathLike, n_train: int = 320, n_val: int = 80, size: int = 128, seed: int = 0) -> Path:
    """Write the dataset under ``root`` (YOLOFuse layout) and return its ``data.yaml``."""
    root = Path(root).resolve()
    for split, count, offset in (("train", n_train, 0), ("val", n_val, 1_000_000)):
        for sub in ("images", "imagesIR", "labels"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rgb, ir, labels = make_scene(seed * 10_000_019 + offset + i, size)
            stem = f"{i:05d}"
            Image.fromarray(rgb, "RGB").save(root / "images" / split / f"{stem}.png")
            Image.fromarray(ir, "L").save(root / "imagesIR" / split / f"{stem}.png")
            lines = "".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in labels)
            (root / "labels" / split / f"{stem}.txt").write_text(lines)
    data_yaml = root / "data.yaml"
    spec = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "names": dict(NAMES),
        "imgsz": size,
        "demo_version": DEMO_VERSION,
    }
    with atomic_write(data_yaml, "w") as f:  # written last: its presence marks a complete dataset
        yaml.safe_dump(spec, f, sort_keys=False)
    return data_yaml


def default_cache_dir() -> Path:
    base = os.environ.get("FUSE_TRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "fuse-train"
    )
    return Path(base)


def ensure_demo(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build the demo dataset in the cache folder once; return its data.yaml."""
    key = hashlib.sha256(f"demo-v{DEMO_VERSION}-320-80-128-0".encode()).hexdigest()[:8]  # new version: new folder
    root = Path(cache_dir or default_cache_dir()) / f"demo-v{DEMO_VERSION}-{key}"
    data_yaml = root / "data.yaml"
    if not data_yaml.exists():
        print(f"building the demo dataset in {root} (once) ...", file=sys.stderr)
        write_demo(root)
    return data_yaml


def resolve_data_yaml(data: str) -> Path:
    """A ``--data`` value as a path: ``demo`` is the embedded demo dataset (built once in the cache)."""
    return ensure_demo() if data == "demo" else Path(data).expanduser().resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fuse_train.data.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dir", help="folder to write the dataset into")
    parser.add_argument("--train", type=int, default=320, help="training pairs (default 320)")
    parser.add_argument("--val", type=int, default=80, help="validation pairs (default 80)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_demo(args.dir, args.train, args.val, args.size, args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
