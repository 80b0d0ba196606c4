"""predict's pictures (issue 26): label tags stay inside their panel and do not cover each other, and a small
input is enlarged so the labels are readable."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fuse_train.inference import MIN_DRAWN_WIDTH, _draw, _overlap, _tag_place

coord = st.floats(0, 320, allow_nan=False)


@given(st.lists(st.tuples(coord, coord, st.floats(1, 200)), min_size=1, max_size=5))
def test_tags_are_inside_the_panel_and_apart(boxes):
    placed = []
    for x, y, bh in boxes:
        tag = _tag_place(x, y, min(320.0, y + bh), 64, 12, 320, 320, placed)
        assert tag[0] >= 0 and tag[2] <= 320 and tag[1] >= 0 and tag[3] <= 320
        assert not any(_overlap(tag, other) for other in placed)
        placed.append(tag)


def test_a_small_pair_is_drawn_enlarged_with_both_panels(tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    ir = np.zeros((64, 64), np.uint8)
    boxes = [
        {"class": 0, "name": "person", "score": 0.9, "xyxy": [0, 0, 10, 10]},
        {"class": 0, "name": "person", "score": 0.8, "xyxy": [2, 2, 12, 12]},
        {"class": 0, "name": "person", "score": 0.7, "xyxy": [50, 50, 64, 64]},
    ]
    _draw(rgb, ir, boxes, tmp_path / "x.jpg")
    image = np.asarray(Image.open(tmp_path / "x.jpg").convert("L"))
    # enlarged by whole pixels towards MIN_DRAWN_WIDTH (at most 4x): 64 px -> 256 px panels
    assert image.shape[1] == 2 * 64 * min(4, -(-MIN_DRAWN_WIDTH // 64)) == 2 * image.shape[0]
    half = image.shape[1] // 2
    assert image[:, :half].max() > 100 and image[:, half:].max() > 100  # boxes and tags in both panels
