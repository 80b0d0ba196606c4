"""fuse-train: what the commands do with its checkpoints (the preflight's run record: ``fuse_train_records.py``).

- verify: the counters in ``progress`` agree with each other, with ``epoch`` and with the result rows; a
  ``.pt`` without ckpttools' content digest is a warning (fuse-train's DCP folders have none: ``dcp.async_save``
  writes what it staged, and every item still carries its CRC32s).
- remap ``--gpus M``: the global batch stays; the per-rank batch becomes batch / M; the data position is a
  global step (the sampler's order depends only on seed and epoch), so it carries over as is; RNG streams:
  rank r < old world size keeps its own, new ranks get streams derived from (seed, global step, rank); the
  per-rank loss sums of a mid-epoch checkpoint are folded into rank 0; ``resolved.world_size`` and ``history``
  record the change, and the digest is rebuilt.  Preflight then accepts the resume on M processes.
"""

from __future__ import annotations

import random
from typing import Any

from ckpttools import layouts as L
from ckpttools.errors import UsageError
from ckpttools.formats.dcp import NAME as DCP
from ckpttools.report import ERROR, Report, counted
from ckpttools.tensors import LazyTensor, TensorSource
from ckpttools.trainers import fuse_train_schema as S
from ckpttools.trainers.base import TrainerRules, now


class FuseTrainRules(TrainerRules):
    layout = L.FUSE_TRAIN
    title = "fuse-train"
    run_folders = True
    # what TensorBoard got at the saved step (epoch time included), not training state
    volatile_metadata = ("progress.logged",)

    def expects_digest(self, format_name: str) -> bool:
        return format_name != DCP

    def rebuilds_missing_digest(self) -> bool:
        return True

    def check(self, tree: dict, report: Report) -> None:
        check_counters(tree, report)

    def position(self, tree: dict) -> str | None:
        p, args = tree.get(S.K_PROGRESS), tree.get(S.K_TRAIN_ARGS)
        if not isinstance(p, dict):
            return None
        try:
            epoch, step, spe = int(p["epoch"]), int(p["step_in_epoch"]), int(p["steps_per_epoch"])
        except (KeyError, TypeError, ValueError):
            return None
        total = args.get("epochs") if isinstance(args, dict) else None
        of = f" of {total}" if total else ""
        if step:
            return f"in epoch {epoch + 1}{of}, step {step} of {spe} (saved mid-epoch)"
        return f"{epoch}{of} epochs done" + (" (finished)" if p.get("finished") else "")

    def sections(self, tree: Any) -> dict[str, Any] | None:
        if not isinstance(tree, dict):
            return None
        return {"model": tree.get(S.K_MODEL), "ema": tree.get(S.K_EMA), "optimizer": tree.get(S.K_OPTIMIZER)}

    def remap_device(self, tree: dict, gpus: int | None, device: str | None, changes: list[str]) -> None:
        if device is not None and isinstance(tree.get(S.K_RESOLVED), dict):
            tree[S.K_RESOLVED]["device"] = device
            changes.append(f"recorded device -> {device}")

    def remap_processes(self, tree: dict, gpus: int, source: TensorSource, changes: list[str]) -> bool:
        remap_world_size(tree, gpus, source, changes)
        return True

    def record_event(self, tree: Any, event: str, changes: list[str]) -> None:
        if isinstance(tree, dict) and isinstance(tree.get(S.K_HISTORY), list):
            step = _progress(tree).get("global_step")
            tree[S.K_HISTORY].append({"event": event, "date": now(), "step": step, "changes": list(changes)})


RULES = FuseTrainRules()


# ---- verify: one definition of where a run stands ---------------------------------------------------------


def check_counters(tree: dict, report: Report) -> None:
    p = tree.get(S.K_PROGRESS)
    if not isinstance(p, dict):
        return
    try:
        spe, epoch, step_in, step = (
            int(p["steps_per_epoch"]),
            int(p["epoch"]),
            int(p["step_in_epoch"]),
            int(p["global_step"]),
        )
    except (KeyError, TypeError, ValueError):
        report.add(ERROR, "counters.bad-progress", "progress record incomplete", "progress")
        return
    # where the run stands (fuse_train.training.state.Segment): the steps per epoch in force since the segment began
    segment = p.get("segment") if isinstance(p.get("segment"), dict) else {}
    try:
        e0, g0 = int(segment.get("epoch", 0)), int(segment.get("global_step", 0))
    except (TypeError, ValueError):
        report.add(ERROR, "counters.bad-progress", f"progress.segment {segment!r} is not two integers", "progress")
        return
    if step != g0 + (epoch - e0) * spe + step_in or not 0 <= step_in <= spe or not 0 <= e0 <= epoch:
        since = f" since step {g0} (epoch {e0})" if (e0, g0) != (0, 0) else ""
        report.add(
            ERROR,
            "counters.inconsistent",
            f"global_step {step} != {g0} + {epoch - e0} epoch(s) x {spe} steps + {step_in}{since}",
            "progress",
        )
    elif (e0, g0) != (0, 0) and not _change_recorded(tree.get(S.K_HISTORY), g0, step):
        report.add(
            ERROR,
            "counters.inconsistent",
            f"the steps per epoch changed at step {g0} (epoch {e0}) but the history records no allowed change there",
            "progress",
        )
    if tree.get(S.K_EPOCH) != epoch - 1:
        report.add(
            ERROR,
            "counters.inconsistent",
            f"epoch {tree.get(S.K_EPOCH)} does not match progress.epoch {epoch} - 1",
            "epoch",
        )
    results = tree.get(S.K_RESULTS)
    if isinstance(results, list) and len(results) != epoch:
        report.add(ERROR, "counters.inconsistent", f"{len(results)} result rows for {epoch} finished epochs", "results")


def _change_recorded(history, first: int, last: int) -> bool:
    """A resume with allowed changes between the segment's anchor and the saved step (the resume's step is the
    anchor plus the steps the epoch had already taken)."""
    for event in history if isinstance(history, list) else []:
        if isinstance(event, dict) and event.get("event") == "resume" and event.get("changes"):
            try:
                if first <= int(event.get("step")) <= last:
                    return True
            except (TypeError, ValueError):
                continue
    return False


# ---- remap --gpus M ---------------------------------------------------------------------------------------


def _progress(tree: dict) -> dict:
    p = tree.get(S.K_PROGRESS)
    return p if isinstance(p, dict) else {}


def remap_world_size(tree: dict, m: int, source: TensorSource, changes: list[str]) -> None:
    import torch

    args, resolved = tree.get(S.K_TRAIN_ARGS) or {}, tree.get(S.K_RESOLVED) or {}
    batch, old = int(args.get("batch", 0)), int(resolved.get("world_size", 1))
    if batch % m:
        raise UsageError(
            f"global batch {batch} is not divisible by {m} processes: the global batch must stay "
            f"{batch} for the run to continue unchanged; pick a process count that divides it"
        )
    resolved["world_size"], resolved["per_rank_batch"] = m, batch // m
    changes.append(
        f"world size {old} -> {m}; global batch stays {batch}, per-rank batch {batch // max(1, old)} -> {batch // m}"
    )
    progress = _progress(tree)
    step = int(progress.get("global_step", 0))
    changes.append(
        f"data position: global step {step} = sample {progress.get('samples_seen', step * batch)} "
        "of the seed's global order (the same on any world size)"
    )

    rng = tree.get(S.K_RNG) or {}
    ranks = list(rng.get("ranks") or [])
    seed = int(args.get("seed", 0))
    new_ranks = [ranks[r] if r < len(ranks) else _derived_rng(seed, step, r, source) for r in range(m)]
    derived = m - min(m, len(ranks))
    changes.append(
        f"RNG streams: ranks 0..{min(m, len(ranks)) - 1} kept"
        + (f", {counted(derived, 'new rank')} derived from (seed {seed}, step {step}, rank)" if derived else "")
        + (f", ranks {m}..{len(ranks) - 1} dropped" if len(ranks) > m else "")
    )
    tree[S.K_RNG] = {**rng, "world_size": m, "ranks": new_ranks}

    sums = progress.get("epoch_loss_sum")
    if isinstance(sums, LazyTensor):

        def folded(t=sums) -> bytes:
            table = torch.zeros(m, 2, dtype=torch.float64)
            # the trainer divides the epoch's sum by steps x world size: rescale the old ranks' total so the
            # epoch mean stays the mean over steps
            table[0] = t.load().to(torch.float64).reshape(-1, 2).sum(0) * (m / old)
            return table.reshape(-1).view(torch.uint8).numpy().tobytes()

        progress["epoch_loss_sum"] = source.computed_tensor("float64", (m, 2), folded)
        if int(progress.get("step_in_epoch", 0)):
            changes.append("mid-epoch loss sums folded into rank 0 (the epoch's mean loss is kept)")


def _derived_rng(seed: int, step: int, rank: int, source: TensorSource) -> dict:
    """Fresh, reproducible RNG streams for a rank that did not exist when the checkpoint was saved."""
    import numpy as np
    import torch

    s = (seed * 1_000_003 + step) * 1_009 + rank
    g = torch.Generator().manual_seed(s)
    torch_state = g.get_state()
    kind, keys, pos, has_gauss, gauss = np.random.RandomState(s % 2**32).get_state()
    torch_bytes = torch_state.numpy().tobytes()
    key_bytes = keys.astype(np.int64).tobytes()
    return {
        "python": random.Random(s).getstate(),
        "torch": source.computed_tensor("uint8", tuple(torch_state.shape), lambda b=torch_bytes: b),
        "numpy": {
            "kind": kind,
            "keys": source.computed_tensor("int64", (len(keys),), lambda b=key_bytes: b),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
    }
