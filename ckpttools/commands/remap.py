"""``ckpt remap CKPT --gpus M / --device cpu|cuda:K -o OUT``: a checkpoint for another process count or device.

fuse-train checkpoints (``--gpus M``): the global batch stays; the per-rank batch becomes batch / M; the data
position is a global step (the sampler's order depends only on seed and epoch), so it carries over as is;
RNG streams: rank r < old world size keeps its own, new ranks get streams derived from (seed, global step,
rank); the per-rank loss sums of a mid-epoch checkpoint are folded into rank 0; ``resolved.world_size`` and
``history`` record the change, and the digest is rebuilt.  Preflight then accepts the resume on M processes.

Other layouts hold no per-rank state: ``--gpus`` strips DDP's ``module.`` prefix (``--add-module-prefix``
adds it for code that loads into a DDP-wrapped model) and says what it could not carry.

``--device``: every storage's recorded location becomes the target, so plain ``torch.load`` on a machine
without that device works (optimizer state included).
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpttools import layouts as L
from ckpttools.atomic import check_new_output, ensure_space, remove_stale
from ckpttools.commands._inputs import open_input
from ckpttools.digest import refresh_digest
from ckpttools.errors import UsageError
from ckpttools.formats import torchzip
from ckpttools.formats.base import to_plain_tree
from ckpttools.formats.registry import DCP
from ckpttools.tensors import LazyTensor, TensorSource, iter_tensors

DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass
class RemapResult:
    input: str
    output: str
    layout: str
    changes: list[str] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "notes": self.changes + [f"not carried: {n}" for n in self.not_carried]}


def remap(
    src: str | os.PathLike,
    out: str | os.PathLike,
    gpus: int | None = None,
    device: str | None = None,
    add_module_prefix: bool = False,
    force: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    allow_unsafe: bool = False,
) -> RemapResult:
    src, out = Path(src), Path(out)
    if gpus is None and device is None:
        raise UsageError("say what to remap to: --gpus M and/or --device cpu|cuda:K")
    if gpus is not None and gpus < 1:
        raise UsageError(f"--gpus {gpus}: must be at least 1")
    if device is not None and not DEVICE.match(device):
        raise UsageError(f"--device {device}: use cpu, cuda or cuda:K")
    check_new_output(out, [src], force)
    ckpt, dangerous = open_input(src, "remap", allow_unsafe)
    if ckpt.format == DCP:
        raise UsageError(
            f"{src}: a DCP folder: `ckpt convert {src} OUT.pt` consolidates it first "
            "(DCP folders are resharded at load time by torch.distributed.checkpoint)"
        )
    tree, source = ckpt.tree, TensorSource(ckpt)
    layout = L.recognise(tree, src)
    result = RemapResult(str(src), str(out), layout)
    if dangerous:  # --allow-unsafe: data only
        tree = to_plain_tree(tree, [])
        result.not_carried.extend(dangerous)
    stale = remove_stale(out.parent)
    if stale:
        result.changes.append(f"removed {len(stale)} temporary file(s) that killed writers left in {out.parent}")

    if layout == L.ULTRALYTICS and isinstance(tree.get("train_args"), dict):
        _ultralytics_device(tree, gpus, device, result)
    if gpus is not None:
        if layout == L.FUSE_TRAIN:
            _fuse_train_world_size(tree, gpus, source, result)
        elif layout == L.ULTRALYTICS and isinstance(tree.get("train_args"), dict):
            pass  # no per-rank state and no prefixes in an Ultralytics checkpoint: the device string is the change
        else:
            _other_world_size(tree, layout, gpus, add_module_prefix, result)
    location = None
    if device is not None:
        before = sorted({t.storage.location for _, t in iter_tensors(tree)})
        location = lambda ref: device  # noqa: E731
        result.changes.append(f"tensor locations {', '.join(before) or '(none)'} -> {device}")
        if layout == L.FUSE_TRAIN and isinstance(tree.get("resolved"), dict):
            tree["resolved"]["device"] = device
            result.changes.append(f"recorded device -> {device}")
    if layout == L.FUSE_TRAIN and isinstance(tree, dict) and isinstance(tree.get("history"), list):
        tree["history"].append(
            {
                "event": "remap",
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "step": _progress(tree).get("global_step"),
                "changes": list(result.changes),
            }
        )
    if refresh_digest(tree, source):
        result.changes.append("content digest rebuilt")
    ensure_space(out, sum(t.storage.nbytes for _, t in iter_tensors(tree)))
    torchzip.write_file(tree, out, source, location=location, on_bytes=on_bytes, replace=force)
    return result


def _ultralytics_device(tree: dict, gpus: int | None, device: str | None, result: RemapResult) -> None:
    """Rewrite ``train_args.device``, the value ``YOLO(last.pt).train(resume=True)`` starts its processes from.
    Ultralytics' ``batch`` is the global batch (split over DDP processes), so it stays; ``workers`` is per
    process and is left as it is.  The change is recorded under the checkpoint's ``ckpttools`` key (Ultralytics
    ignores unknown top-level keys, but would refuse unknown ``train_args`` keys on resume)."""
    args = tree["train_args"]
    old = args.get("device")
    if device is not None and device != "cpu" and gpus is None:
        new = device.split(":", 1)[1] if ":" in device else "0"
    elif device == "cpu":
        new = "cpu"
    else:
        new = ",".join(str(i) for i in range(gpus)) if gpus and gpus > 1 else "0"
    if str(old) == new:
        result.changes.append(f"train_args.device is already {new!r}")
        return
    args["device"] = new
    result.changes.append(
        f"train_args.device {old!r} -> {new!r} (what Ultralytics resumes on); global batch {args.get('batch')} kept"
    )
    record = tree.setdefault("ckpttools", {})
    if isinstance(record, dict):
        record.setdefault("history", []).append(
            {
                "event": "remap",
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "changes": {"train_args.device": [old, new]},
            }
        )


def _progress(tree: dict) -> dict:
    p = tree.get("progress")
    return p if isinstance(p, dict) else {}


def _fuse_train_world_size(tree: dict, m: int, source: TensorSource, result: RemapResult) -> None:
    import torch

    args, resolved = tree.get("train_args") or {}, tree.get("resolved") or {}
    batch, old = int(args.get("batch", 0)), int(resolved.get("world_size", 1))
    if batch % m:
        raise UsageError(
            f"global batch {batch} is not divisible by {m} processes: the global batch must stay "
            f"{batch} for the run to continue unchanged; pick a process count that divides it"
        )
    resolved["world_size"], resolved["per_rank_batch"] = m, batch // m
    result.changes.append(
        f"world size {old} -> {m}; global batch stays {batch}, per-rank batch {batch // max(1, old)} -> {batch // m}"
    )
    progress = _progress(tree)
    step = int(progress.get("global_step", 0))
    result.changes.append(
        f"data position: global step {step} = sample {progress.get('samples_seen', step * batch)} "
        "of the seed's global order (the same on any world size)"
    )

    rng = tree.get("rng") or {}
    ranks = list(rng.get("ranks") or [])
    seed = int(args.get("seed", 0))
    new_ranks = []
    for r in range(m):
        if r < len(ranks):
            new_ranks.append(ranks[r])
        else:
            new_ranks.append(_derived_rng(seed, step, r, source))
    derived = m - min(m, len(ranks))
    result.changes.append(
        f"RNG streams: ranks 0..{min(m, len(ranks)) - 1} kept"
        + (f", {derived} new rank(s) derived from (seed {seed}, step {step}, rank)" if derived else "")
        + (f", ranks {m}..{len(ranks) - 1} dropped" if len(ranks) > m else "")
    )
    tree["rng"] = {**rng, "world_size": m, "ranks": new_ranks}

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
            result.changes.append("mid-epoch loss sums folded into rank 0 (the epoch's mean loss is kept)")


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


def _other_world_size(tree: Any, layout: str, m: int, add_prefix: bool, result: RemapResult) -> None:
    containers = [weights for _, weights in L.weight_dicts(tree, layout)]
    if not containers:
        found = L.weights_of(tree, layout) if layout in L.LAYOUTS else None
        what = "pickled model objects" if found else "no weight dict"
        result.not_carried.append(f"{layout} checkpoint holds {what}: names left as they are")
    for weights in containers:
        items = list(weights.items())
        renamed = [(L.with_ddp_prefix(k, add_prefix), v) for k, v in items]
        changed = sum(1 for (a, _), (b, _) in zip(items, renamed) if a != b)
        weights.clear()
        weights.update(renamed)
        if changed:
            result.changes.append(f"{'added' if add_prefix else 'stripped'} the module. prefix on {changed} name(s)")
    result.not_carried.append(
        f"{layout} checkpoints record no per-rank state (RNG, sampler position) here: "
        f"the {m}-process run starts those afresh"
    )
