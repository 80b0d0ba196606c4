"""Checkpoint *folders* recognised by the files they hold (a DCP plan, a Hugging Face Trainer's state, ...).
A container-level fact the format readers need to open a folder; ``layouts.py`` names these layouts beside the
file layouts.  Nothing here reads a checkpoint's content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DCP_LAYOUT, HF, HF_TRAINER, ACCELERATE, DEEPSPEED = "dcp", "huggingface", "hf-trainer", "accelerate", "deepspeed"

# Folders: (name, title, marker paths that must all exist, where the weights are)
FOLDER_LAYOUTS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (DCP_LAYOUT, "torch.distributed.checkpoint folder", (".metadata",), "the .metadata plan + __*_*.distcp shards"),
    (
        HF_TRAINER,
        "Hugging Face Trainer checkpoint-N/",
        ("trainer_state.json",),
        "model.safetensors / pytorch_model.bin; optimizer.pt, scheduler.pt, rng_state.pth; step in trainer_state.json",
    ),
    (
        ACCELERATE,
        "Accelerate save_state folder",
        ("random_states_0.pkl",),
        "model.safetensors / pytorch_model.bin, optimizer.bin, scheduler.bin, random_states_<rank>.pkl",
    ),
    (
        DEEPSPEED,
        "DeepSpeed checkpoint folder",
        ("latest",),
        "<tag>/mp_rank_*_model_states.pt, <tag>/*_optim_states.pt; the tag in `latest`",
    ),
    (
        HF,
        "Hugging Face save_pretrained (single or sharded)",
        ("config.json",),
        "model.safetensors or model-*-of-*.safetensors + model.safetensors.index.json (or pytorch_model*.bin)",
    ),
)


FOLDER_NAMES = frozenset(name for name, *_ in FOLDER_LAYOUTS)


def recognise_folder(path: Path) -> str | None:
    """The folder layout whose markers ``path`` has (the table is ordered specific first)."""
    if not path.is_dir():
        return None
    for name, _title, markers, _where in FOLDER_LAYOUTS:
        if all((path / m).exists() for m in markers):
            if name == HF and not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
                continue
            return name
    return None


def folder_counters(path: Path) -> dict[str, Any]:
    """The step / epoch a checkpoint folder records (a Hugging Face Trainer's trainer_state.json); {} when it
    records none.  Raises ValueError when that file is not valid JSON."""
    state = path / "trainer_state.json"
    if not state.is_file():
        return {}
    try:
        data = json.loads(state.read_text())
    except UnicodeDecodeError as exc:
        raise ValueError(str(exc)) from None
    out = {"step": data.get("global_step")}
    if isinstance(data.get("epoch"), (int, float)):
        out["epoch"] = data["epoch"]
    return out
