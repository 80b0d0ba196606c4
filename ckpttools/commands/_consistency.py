"""What ``ckpt verify`` checks of a checkpoint's shape once its bytes are read: the layout its trainer writes
(``check_layout``: what the trainer's rules in ``trainers/`` require, TorchScript archives) and whether its parts
agree (``check_consistency``: optimizer state against the parameters it steps)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from ckpttools import layouts as L
from ckpttools.formats.registry import Checkpoint
from ckpttools.report import ERROR, INFO, WARNING, Report
from ckpttools.tensors import LazyTensor
from ckpttools.trainers.registry import rules_for
from ckpttools.weights import BUFFER_SUFFIXES, parameter_count, weights_of


def check_layout(ckpt: Checkpoint, report: Report) -> None:
    tree = ckpt.tree
    layout = report.layout
    if tree is None:
        return
    spec = L.LAYOUTS.get(layout)
    if spec:
        for key in spec.required:
            if key not in tree:
                report.add(ERROR, "layout.missing-key", f"{layout} checkpoint without {key!r}", key)
    note = LAYOUT_NOTES.get(layout)
    if note:
        note(ckpt, report)
    if isinstance(tree, dict):
        rules = rules_for(layout)
        rules.check(tree, report)
        position = rules.position(tree)
        if position:
            report.facts["position"] = position
    if isinstance(tree, dict) and "epoch" in tree:
        epoch = tree["epoch"]
        if not isinstance(epoch, int) or epoch < -1:
            report.add(ERROR, "counters.bad-epoch", f"epoch {epoch!r} is not an integer >= -1", "epoch")
        else:
            report.facts["epoch"] = epoch
    if isinstance(tree, dict):
        step = tree.get(
            "global_step",
            (tree.get("progress") or {}).get("global_step") if isinstance(tree.get("progress"), dict) else None,
        )
        if step is not None:
            report.facts["step"] = step
        if "best_fitness" in tree:
            report.facts["best_fitness"] = tree["best_fitness"]


def _unknown_layout(ckpt: Checkpoint, report: Report) -> None:
    report.add(
        WARNING,
        "layout.unknown",
        "not a layout this tool knows (docs/layouts.md lists them); bytes and safety were still checked",
        "",
    )


def _torchscript(ckpt: Checkpoint, report: Report) -> None:
    code = sorted(n.split("/", 1)[-1] for n in (ckpt.records or {}) if "/code/" in n and n.endswith(".py"))
    report.add(
        WARNING,
        "layout.torchscript",
        f"a TorchScript program: torch.jit.load runs its code "
        f"({', '.join(code[:4])}{', ...' if len(code) > 4 else ''}); listed, not judged",
        "code/",
    )


LAYOUT_NOTES: dict[str, Callable[[Checkpoint, Report], None]] = {
    L.UNKNOWN: _unknown_layout,
    L.TORCHSCRIPT: _torchscript,
}


def check_consistency(ckpt: Checkpoint, report: Report) -> None:
    tree, layout = ckpt.tree, report.layout
    found = weights_of(tree, layout) if tree is not None else None
    if found is None:
        return
    key, weights = found
    params = {k: t for k, t in weights.items() if not k.endswith(BUFFER_SUFFIXES)}
    report.facts["parameter_count"] = parameter_count(tree, layout)
    report.facts["weights_key"] = key
    prefix = L.common_prefix(list(weights))
    if prefix:
        report.add(
            WARNING,
            "keys.prefix",
            f"every weight name starts with {prefix!r} (saved from a DDP / "
            f"torch.compile wrapper); `ckpt repair {ckpt.path} -o OUT` strips it",
            key or "state dict",
        )
    if isinstance(tree, dict):
        spec = L.LAYOUTS.get(layout)
        opt = rules_for(layout).optimizer_state(tree, spec.optimizer) if spec and spec.optimizer else None
        if isinstance(opt, dict):
            _check_optimizer(opt, params, report, spec.optimizer)


def _check_optimizer(opt: dict, params: dict[str, LazyTensor], report: Report, where: str) -> None:
    groups = opt.get("param_groups") or []
    ids = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
    trainable = [t for t in params.values() if t.dtype.startswith(("float", "bfloat", "complex"))]
    if ids and len(ids) > len(trainable):
        report.add(
            ERROR,
            "optimizer.param-count",
            f"optimizer holds {len(ids)} parameters, the model only {len(trainable)} floating tensors",
            where,
        )
        return
    if ids and len(ids) < len(trainable):  # frozen parameters and float buffers are not optimised: normal
        report.add(
            INFO,
            "optimizer.partial",
            f"optimizer holds {len(ids)} of the model's {len(trainable)} floating "
            "tensors (frozen parameters or floating buffers); compared: the shapes of its state",
            where,
        )
    state = opt.get("state") or {}
    shapes_state = Counter()
    for entry in state.values():
        if isinstance(entry, dict):
            for name in ("exp_avg", "momentum_buffer", "square_avg", "sum"):
                t = entry.get(name)
                if isinstance(t, LazyTensor):
                    shapes_state[t.shape] += 1
                    break
    if shapes_state:
        shapes_params = Counter(t.shape for t in trainable)
        extra = shapes_state - shapes_params
        if extra:
            shape, _ = next(iter(extra.items()))
            report.add(
                ERROR,
                "optimizer.shape-mismatch",
                f"optimizer state for a parameter of shape {list(shape)} that the model does not have",
                where,
            )
