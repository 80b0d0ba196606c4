"""Repair never swaps good data for stale: damage to zip metadata alone comes back bitwise, even with --from.
And the corruption corpus against --resume: no damaged last.pt is ever picked to train from."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from ckpttools.commands.diff import diff_checkpoints
from ckpttools.commands.repair import repair

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))
from make_corpus import apply, variants  # noqa: E402

METADATA = (
    "bit flip in local-header",
    "bit flip in central-directory",
    "bit flip in descriptor",
    "bit flip in end-records",
    "bit flip in other-record",
)


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(
        {
            "model": {f"l{i}.weight": torch.randn(64, 32) for i in range(12)},
            "epoch": seed,
            "optimizer": {"state": {0: {"exp_avg": torch.randn(64, 32)}}, "param_groups": [{"lr": 0.1}]},
        },
        path,
    )
    return path


def _metadata_damage(src: Path):
    return [v for v in variants(src, flips=40, truncations=0, seed=5) if v["kind"] in METADATA]


def test_metadata_damage_is_repaired_bitwise_and_never_filled_from_the_backup(tmp_path):
    src = _checkpoint(tmp_path / "last.pt", 0)
    older = _checkpoint(tmp_path / "last.prev.pt", 1)  # same names and shapes, other values
    cases = _metadata_damage(src)
    assert len(cases) >= 60
    for v in cases:
        bad = tmp_path / "bad.pt"
        apply(src, v, bad)
        out = tmp_path / "fixed.pt"
        result = repair(bad, out, from_=older, force=True)
        assert result.repaired, (v, result.problems)
        assert not result.filled and not result.lost, (v, result.filled)
        assert diff_checkpoints(src, out).verdict == "identical", v


@pytest.mark.slow  # uses the session's reference training run
def test_no_damaged_checkpoint_is_picked_for_resume(reference_run, tmp_path):
    from fuse_train.launch.resume import ResumeError, trusted_checkpoint

    weights = tmp_path / "exp" / "weights"
    weights.mkdir(parents=True)
    good = reference_run[0] / "weights" / "last.pt"
    shutil.copy(reference_run[0] / "weights" / "epoch2.pt", weights / "last.prev.pt")
    picked = {"fallback": 0, "refused": 0}
    for v in variants(good, flips=6, truncations=8, seed=2):
        last = weights / "last.pt"
        apply(good, v, last)
        try:
            chosen = trusted_checkpoint(last)
        except ResumeError:
            picked["refused"] += 1
            continue
        assert chosen == weights / "last.prev.pt", f"{v}: would train from the damaged file"
        picked["fallback"] += 1
    assert picked["fallback"] > 30 and picked["refused"] == 0  # the good last.prev.pt is taken every time
