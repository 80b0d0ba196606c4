"""What a person reads from `ckpt diff` (issue 26): at any width every tensor name appears whole (wrapped at
dots only when it cannot fit, never inside a component), no line wider than the terminal, the largest relative
change first, counters in one line, metadata fields written as paths."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from ckpttools.cli import main as CKPT
from ckpttools.render_diff import _dot_parts, _name_lines

component = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz_0123456789"), min_size=1, max_size=30)


@given(parts=st.lists(component, min_size=1, max_size=12), width=st.integers(40, 220))
def test_a_name_is_whole_on_one_line_if_it_fits_and_wrapped_only_after_a_dot(parts, width):
    name = "model/" + ".".join(parts)
    lines = _name_lines(name, width)
    shown = [lines[0]] + [line.removeprefix("  ") for line in lines[1:]]
    assert "".join(shown) == name  # the whole name, nothing cut, nothing added
    for piece in shown[:-1]:
        assert piece.endswith((".", "/"))  # a wrap only after a dot (or the section's slash)
    longest = max(len(p) for p in _dot_parts(name))
    assert all(len(line) <= max(width, 2 + longest) for line in lines)
    assert (len(lines) == 1) == (len(name) <= width)


def _model(seed: int, bn_steps: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(30):
        name = f"backbone_infrared.stage{i % 4}.block{i}.cross_modal_attention.projection.weight"
        sd[name] = torch.randn(4, 4, generator=g)
        sd[f"backbone_infrared.stage{i % 4}.block{i}.norm.num_batches_tracked"] = torch.tensor(bn_steps)
    return sd


@pytest.mark.parametrize("columns", [80, 200])
def test_human_diff_fits_the_terminal_and_names_every_tensor_whole(tmp_path, columns):
    a, b = _model(0, 10), _model(0, 12)
    b["backbone_infrared.stage0.block0.cross_modal_attention.projection.weight"] *= 3  # the biggest change
    b["backbone_infrared.stage1.block1.cross_modal_attention.projection.weight"] += 1e-3
    torch.save({"model": a, "results": [{"mAP50": 0.1}, {"mAP50": 0.2}]}, tmp_path / "a.pt")
    torch.save({"model": b, "results": [{"mAP50": 0.1}, {"mAP50": 0.3}]}, tmp_path / "b.pt")
    result = CliRunner().invoke(
        CKPT,
        ["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")],
        terminal_width=columns,
        env={"COLUMNS": str(columns)},
    )
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= columns for line in lines), [line for line in lines if len(line) > columns]
    assert all(line == line.rstrip() for line in lines), [line for line in lines if line != line.rstrip()]
    numbers = [line for line in lines if re.match(r"^\s*[\d.e+-]+\s+[\d.e+-]+\s+[\d.e+-]+\s+[\d,]+(\s|$)", line)]
    assert len(numbers) == 2  # the two weights that changed; the 30 counters are not rows
    names = [
        f"model/backbone_infrared.{n}.cross_modal_attention.projection.weight"
        for n in ("stage0.block0", "stage1.block1")
    ]
    where = [next(i for i, line in enumerate(lines) if name in line) for name in names]  # each whole on one line
    assert where[0] < where[1]  # the largest relative change first
    assert any(line.startswith("counters: 30 integer scalars") for line in lines)
    assert "results[1].mAP50" in result.output
