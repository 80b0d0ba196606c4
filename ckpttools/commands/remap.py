"""``ckpt remap CKPT --gpus M / --device cpu|cuda:K -o OUT``: a checkpoint for another process count or device.

``--gpus M``: a trainer that keeps per-process state carries it to M processes (its module in
``ckpttools/trainers/`` says how: ``remap_processes``).  Other checkpoints hold no per-rank state: ``--gpus``
strips DDP's ``module.`` prefix (``--add-module-prefix`` adds it for code that loads into a DDP-wrapped model)
and says what it could not carry.  Where the trainer records the device it resumes on, that record follows
(``remap_device``), and the change is noted in the checkpoint's own history where it keeps one.

``--device``: every storage's recorded location becomes the target, so plain ``torch.load`` on a machine
without that device works (optimizer state included).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpttools import layouts as L
from ckpttools.atomic import check_new_output, clear_stale, ensure_space
from ckpttools.commands._inputs import open_input
from ckpttools.digest import refresh_digest
from ckpttools.errors import UsageError
from ckpttools.formats import torchzip
from ckpttools.formats.base import to_plain_tree
from ckpttools.formats.registry import DCP
from ckpttools.report import counted
from ckpttools.tensors import TensorSource
from ckpttools.trainers.base import GENERIC
from ckpttools.trainers.registry import rules_for
from ckpttools.trees import iter_tensors
from ckpttools.weights import weight_dicts, weights_of

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
    result.changes.extend(clear_stale(out.parent))

    rules = rules_for(layout) if isinstance(tree, dict) else GENERIC
    if gpus is not None and not rules.remap_processes(tree, gpus, source, result.changes):
        _other_world_size(tree, layout, gpus, add_module_prefix, result)
    location = None
    if device is not None:
        before = sorted({t.storage.location for _, t in iter_tensors(tree)})
        location = lambda ref: device  # noqa: E731
        result.changes.append(f"tensor locations {', '.join(before) or '(none)'} -> {device}")
    rules.remap_device(tree, gpus, device, result.changes)  # the device the trainer records it resumes on
    rules.record_event(tree, "remap", result.changes)
    if refresh_digest(tree, source):
        result.changes.append("content digest rebuilt")
    ensure_space(out, sum(t.storage.nbytes for _, t in iter_tensors(tree)))
    torchzip.write_file(tree, out, source, location=location, on_bytes=on_bytes, replace=force)
    return result


def _other_world_size(tree: Any, layout: str, m: int, add_prefix: bool, result: RemapResult) -> None:
    containers = [weights for _, weights in weight_dicts(tree, layout)]
    if not containers:
        found = weights_of(tree, layout) if layout in L.LAYOUTS else None
        what = "pickled model objects" if found else "no weight dict"
        result.not_carried.append(f"{layout} checkpoint holds {what}: names left as they are")
    for weights in containers:
        items = list(weights.items())
        renamed = [(L.with_ddp_prefix(k, add_prefix), v) for k, v in items]
        changed = sum(1 for (a, _), (b, _) in zip(items, renamed) if a != b)
        weights.clear()
        weights.update(renamed)
        if changed:
            result.changes.append(
                f"{'added' if add_prefix else 'stripped'} the module. prefix on {counted(changed, 'name')}"
            )
    result.not_carried.append(
        f"{layout} checkpoints record no per-rank state (RNG, sampler position) here: "
        f"the {m}-process run starts those afresh"
    )
