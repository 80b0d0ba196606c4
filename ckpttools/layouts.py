"""Recognise whose checkpoint this is, and where its weights and optimizer state live.

Layouts are data (a table of rules), not branches spread over the code: each names the keys it needs
and where the model weights and optimizer state are found.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ckpttools.formats.folders import (  # noqa: F401 - the folder layouts, named here with the file layouts
    ACCELERATE,
    DCP_LAYOUT,
    DEEPSPEED,
    FOLDER_LAYOUTS,
    FOLDER_NAMES,
    HF,
    HF_TRAINER,
    folder_counters,
    recognise_folder,
)
from ckpttools.objects import Placeholder
from ckpttools.tensors import TENSOR_TYPES
from ckpttools.trainers import fuse_train_schema as F
from ckpttools.trainers.yolofuse_schema import is_yolofuse

# ---- wrapper prefixes: the one definition ------------------------------------------------------------------
DDP_PREFIX, COMPILE_PREFIX = "module.", "_orig_mod."
PREFIXES = (DDP_PREFIX, COMPILE_PREFIX)  # what DDP / torch.compile wrappers prepend to every weight name


def common_prefix(names) -> str | None:
    """The wrapper prefix that every one of ``names`` starts with, if any."""
    names = [n for n in names if isinstance(n, str)] if names else []
    for prefix in PREFIXES:
        if names and all(n.startswith(prefix) for n in names):
            return prefix
    return None


def with_ddp_prefix(name, add: bool):
    """``name`` with DDP's ``module.`` prefix added (``add``) or removed; non-string keys unchanged."""
    if not isinstance(name, str):
        return name
    if add:
        return name if name.startswith(DDP_PREFIX) else DDP_PREFIX + name
    return name[len(DDP_PREFIX) :] if name.startswith(DDP_PREFIX) else name


FUSE_TRAIN, YOLOFUSE, ULTRALYTICS, LIGHTNING, STATE_DICT, UNKNOWN = (
    "fuse-train",
    "yolofuse",
    "ultralytics",
    "lightning",
    "state-dict",
    "unknown",
)
YOLOV5, TIMM, NANOGPT, MMENGINE, DETECTRON2, TUTORIAL, GENERIC, MODULE, TORCHSCRIPT = (
    "yolov5",
    "timm",
    "nanogpt",
    "mmengine",
    "detectron2",
    "torch-tutorial",
    "generic",
    "pickled-module",
    "torchscript",
)
TORCH_EXPORT = "torch-export"

WEIGHT_KEYS = ("model", "state_dict", "model_state_dict", "net", "network", "module", "model_state")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt_state", "optimizer_state")
EPOCH_KEYS = ("epoch", "epochs")
STEP_KEYS = ("global_step", "step", "iteration", "iter", "iter_num", "steps")


@dataclass(frozen=True)
class Layout:
    """One writer's checkpoint: how to recognise it and where each piece lives (top-level keys)."""

    name: str
    title: str
    required: tuple[str, ...] = ()  # every one of these top-level keys
    any_of: tuple[str, ...] = ()  # and at least one of these
    weights: tuple[str, ...] = ()  # candidate keys of the model's weights (a state dict or a pickled module)
    optimizer: str | None = None
    ema: str | None = None
    scheduler: str | None = None
    scaler: str | None = None
    epoch: str | None = None
    step: str | None = None
    hparams: str | None = None
    rng: str | None = None
    recognise: Callable[[dict], bool] | None = None  # a rule beyond keys, where keys alone are ambiguous


def _lightning(tree: dict) -> bool:
    return "state_dict" in tree and bool(
        {"pytorch-lightning_version", "optimizer_states", "loops", "lr_schedulers"} & tree.keys()
    )


def _ultralytics(tree: dict) -> bool:
    return ("model" in tree or "ema" in tree) and (
        "train_args" in tree or _is_ultralytics_obj(tree.get("model")) or _is_ultralytics_obj(tree.get("ema"))
    )


def _yolofuse(tree: dict) -> bool:
    return _ultralytics(tree) and is_yolofuse(tree)


def _generic(tree: dict) -> bool:
    return any(_holds_weights(tree.get(k)) for k in WEIGHT_KEYS + ("ema",))


_ULTRALYTICS_ROW = Layout(
    ULTRALYTICS,
    "Ultralytics YOLOv8 / YOLO11 (resumable and stripped)",
    ("epoch", "model"),
    (),
    ("ema", "model"),
    "optimizer",
    "ema",
    None,
    "scaler",
    "epoch",
    None,
    "train_args",
    recognise=_ultralytics,
)
YOLOFUSE_TITLE = "YOLOFuse (RGB+IR fork of Ultralytics 8.3.74; resumable and stripped)"  # keys as Ultralytics

# In recognition order (the first that matches): specific writers before the generic rules.
FILE_LAYOUTS: tuple[Layout, ...] = (
    Layout(
        FUSE_TRAIN,
        "fuse-train",
        F.REQUIRED_KEYS,
        (),
        (F.K_MODEL, F.K_EMA),
        F.K_OPTIMIZER,
        F.K_EMA,
        F.K_SCHEDULER,
        F.K_SCALER,
        F.K_EPOCH,
        "progress.global_step",
        F.K_TRAIN_ARGS,
        F.K_RNG,
        recognise=F.is_fuse_train,
    ),
    Layout(
        LIGHTNING,
        "PyTorch Lightning Trainer",
        ("state_dict", "epoch", "global_step"),
        (),
        ("state_dict",),
        "optimizer_states",
        None,
        "lr_schedulers",
        None,
        "epoch",
        "global_step",
        "hyper_parameters",
        recognise=_lightning,
    ),
    replace(_ULTRALYTICS_ROW, name=YOLOFUSE, title=YOLOFUSE_TITLE, recognise=_yolofuse),  # before Ultralytics'
    _ULTRALYTICS_ROW,
    Layout(
        YOLOV5,
        "YOLOv5 train.py (pickled model + ema + optimizer, `opt`)",
        ("model", "optimizer", "opt"),
        (),
        ("ema", "model"),
        "optimizer",
        "ema",
        None,
        None,
        "epoch",
        None,
        "opt",
    ),
    Layout(
        TIMM,
        "timm train.py / CheckpointSaver",
        ("state_dict",),
        ("arch", "version"),
        ("state_dict",),
        "optimizer",
        "state_dict_ema",
        None,
        "amp_scaler",
        "epoch",
        None,
        "args",
    ),
    Layout(
        NANOGPT,
        "nanoGPT train.py",
        ("model", "model_args", "iter_num"),
        (),
        ("model",),
        "optimizer",
        None,
        None,
        None,
        None,
        "iter_num",
        "config",
    ),
    Layout(
        MMENGINE,
        "MMEngine Runner (OpenMMLab)",
        ("meta", "state_dict"),
        ("message_hub", "optimizer"),
        ("state_dict",),
        "optimizer",
        None,
        "param_schedulers",
        None,
        "meta.epoch",
        "meta.iter",
        "meta",
    ),
    Layout(
        DETECTRON2,
        "detectron2 Checkpointer",
        ("model", "iteration"),
        (),
        ("model",),
        "optimizer",
        None,
        "scheduler",
        None,
        None,
        "iteration",
        None,
    ),
    Layout(
        TUTORIAL,
        "PyTorch tutorial dict (model_state_dict, optimizer_state_dict)",
        ("model_state_dict",),
        (),
        ("model_state_dict",),
        "optimizer_state_dict",
        None,
        None,
        None,
        "epoch",
        None,
        None,
    ),
    Layout(
        GENERIC,
        "a dict with the weights under a common key (model, state_dict, net, ...)",
        (),
        (),
        WEIGHT_KEYS + ("ema",),
        "optimizer",
        "ema",
        "scheduler",
        "scaler",
        "epoch",
        "step",
        None,
        recognise=_generic,
    ),
    Layout(STATE_DICT, "a bare state dict (name -> tensor)", (), (), ("",)),
)
LAYOUTS = {layout.name: layout for layout in FILE_LAYOUTS}


def _holds_weights(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and sum(isinstance(v, TENSOR_TYPES) for v in value.values()) >= max(1, len(value) // 2)
    return _is_module(value)


def _is_module(value: Any) -> bool:
    return isinstance(value, Placeholder) and isinstance(value._state, dict) and "_modules" in value._state


def recognise(tree: Any, path: Path | None = None) -> str:
    if path is not None and path.is_dir():
        return recognise_folder(path) or UNKNOWN
    if _is_module(tree):
        return MODULE
    if not isinstance(tree, dict):
        return UNKNOWN
    for layout in FILE_LAYOUTS[:-1]:
        if layout.recognise is not None:
            if layout.recognise(tree):
                return layout.name
        elif (
            layout.required
            and all(k in tree for k in layout.required)
            and (not layout.any_of or any(k in tree for k in layout.any_of))
        ):
            return layout.name
    if tree and all(isinstance(k, str) for k in tree) and all(isinstance(v, TENSOR_TYPES) for v in tree.values()):
        return STATE_DICT
    if "state_dict" in tree and isinstance(tree["state_dict"], dict):
        return STATE_DICT
    return UNKNOWN


def recognise_checkpoint(ckpt) -> str:
    """``recognise`` for an opened checkpoint, which also knows its container: a zip with ``code/`` records is
    a TorchScript program, a .pt2 archive a torch.export program."""
    if ckpt.format == "pt2":
        return TORCH_EXPORT
    records = getattr(ckpt, "records", None) or {}
    if any("/code/" in name and name.endswith(".py") for name in records):
        return TORCHSCRIPT
    return recognise(ckpt.tree, ckpt.path)


def _is_ultralytics_obj(obj: Any) -> bool:
    return isinstance(obj, Placeholder) and obj._reference.module.startswith("ultralytics")


def markdown_table() -> str:
    """docs/layouts.md's tables (a test checks the committed copy): ``python -m ckpttools.layouts``."""

    def cell(value: Any) -> str:
        return f"`{value}`" if value else "-"

    rows = [
        "| layout | writer | recognised by | weights | EMA | optimizer | scheduler | scaler | epoch | step | "
        "hyperparameters | RNG |",
        "|" + "---|" * 12,
    ]
    for x in FILE_LAYOUTS:
        rule = " + ".join(f"`{k}`" for k in x.required) or "-"
        if x.any_of:
            rule += " + one of " + ", ".join(f"`{k}`" for k in x.any_of)
        if x.recognise is not None:
            rule = {
                GENERIC: "a dict of tensors or a pickled module under one of the weight keys",
                ULTRALYTICS: f"{rule} + `train_args` or a pickled `ultralytics` model",
                YOLOFUSE: f"{rule} as Ultralytics + YOLOFuse's input modules or its `train_args.ch`",
            }.get(x.name, rule)
        if x.name == STATE_DICT:
            rule = "every value a tensor"
        weights = ", ".join(f"`{k}`" for k in x.weights if k) or "the whole file"
        rows.append(
            f"| `{x.name}` | {x.title} | {rule} | {weights} | {cell(x.ema)} | {cell(x.optimizer)} | "
            f"{cell(x.scheduler)} | {cell(x.scaler)} | {cell(x.epoch)} | {cell(x.step)} | {cell(x.hparams)} | "
            f"{cell(x.rng)} |"
        )
    rows += ["", "| folder layout | writer | recognised by | where things are |", "|---|---|---|---|"]
    rows += [
        f"| `{n}` | {t} | {', '.join(f'`{m}`' for m in markers)} | {where} |" for n, t, markers, where in FOLDER_LAYOUTS
    ]
    return (
        "# Checkpoint layouts\n\nGenerated by `python -m ckpttools.layouts` from the table in "
        "`ckpttools/layouts.py`; recognition follows the order of the rows (specific writers first).\n"
        f"Also: `{MODULE}` (a whole `torch.save(model)`: the weights are the module's parameters and buffers), "
        f"`{TORCHSCRIPT}` (a `torch.jit.save` program: its code is listed, not judged), `{TORCH_EXPORT}` (a "
        "`torch.export` `.pt2` archive: its weights listed, its program named, not judged); `.keras` archives "
        "are declined (exit 2), never called damaged.\n\n" + "\n".join(rows) + "\n"
    )


def content_layout(tree: Any, layout: str) -> str:
    """The layout of what a checkpoint holds: a DCP folder is judged by the state dict inside it."""
    return recognise(tree) if layout == DCP_LAYOUT else layout


if __name__ == "__main__":
    print(markdown_table(), end="")
