"""fuse-train's checkpoints, read: the one place that loads a ``.pt`` file or a DCP folder (never running a
pickle: ``weights_only`` for files, ckpttools' inert reader for folders), judges its integrity as `ckpt verify`
does, and picks the previous good copy when ``last.pt`` is damaged.  Resume, val, predict and export all read
through here; writing is the trainer's (``Trainer.checkpoint_dict``, ``async_save``, ``dcp_save``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ckpttools.atomic import previous_path
from ckpttools.commands._inputs import open_input
from ckpttools.commands.verify import verify as verify_checkpoint
from ckpttools.errors import CkptError
from ckpttools.trainers import fuse_train_schema as S
from ckpttools.trees import materialise


class ResumeError(ValueError):
    """A resume that cannot start (no checkpoint, unreadable file, finished run); the message says what to do."""


def load_checkpoint(path: Path) -> dict:
    """Read a fuse-train checkpoint safely (weights_only; a DCP folder is judged by ckpttools' inert reader first);
    the previous good copy is named when this fails."""
    try:
        ckpt = load_folder(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
    except CkptError as exc:  # a DCP folder that is damaged or would run code
        raise ResumeError(str(exc)) from None
    except FileNotFoundError:
        raise ResumeError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one message
        prev = previous_path(path)
        hint = f"; the previous good checkpoint is {prev} (check it with: ckpt verify {prev})" if prev.exists() else ""
        raise ResumeError(f"{path}: cannot read checkpoint ({str(exc).splitlines()[0]}){hint}") from None
    if not isinstance(ckpt, dict) or ckpt.get(S.K_FORMAT) != S.FORMAT_NAME:
        raise ResumeError(f"{path}: not a fuse-train checkpoint (no format: {S.FORMAT_NAME})")
    if ckpt.get(S.K_VERSION, 0) > S.FORMAT_VERSION:
        raise ResumeError(
            f"{path}: checkpoint format version {ckpt[S.K_VERSION]} is newer than this fuse-train "
            f"understands ({S.FORMAT_VERSION}); upgrade fuse-train"
        )
    return ckpt


def trusted_checkpoint(path: Path, console=None) -> Path:
    """``path`` if it passes `ckpt verify` (every CRC32, the digest, structure); else its ``last.prev.pt`` if
    that one does, said in one line; else a ResumeError that names `ckpt repair`."""
    problem = integrity_problem(path)
    if problem is None:
        return path
    prev = previous_path(path)
    if prev.exists() and integrity_problem(prev) is None:
        if console is not None:
            console.print(
                f"{path} is damaged ({problem}); resuming from the previous good checkpoint {prev}",
                markup=False,
                highlight=False,
            )
        return prev
    fallback = (
        f"the previous checkpoint {prev} is damaged too"
        if prev.exists()
        else f"there is no previous checkpoint ({prev.name})"
    )
    if path.is_dir():  # a DCP folder: `ckpt repair` reads single files, and a damaged folder is never loaded
        raise ResumeError(
            f"{path}: damaged ({problem}); {fallback}. Resume from an earlier checkpoint of the run "
            "(epoch{N}.dcp, best.dcp): --resume PATH"
        )
    raise ResumeError(
        f"{path}: damaged ({problem}); {fallback}. Salvage it with `ckpt repair {path} -o FIXED.pt` "
        "and resume from FIXED.pt, or pass --no-verify to resume from it anyway"
    )


def integrity_problem(path: Path) -> str | None:
    """What `ckpt verify` finds wrong with ``path`` first (one line), or None when it passes."""
    try:
        errors = verify_checkpoint(path).errors
    except CkptError as exc:
        return str(exc)
    return f"{errors[0].code}: {errors[0].message}" if errors else None


def load_folder(path: Path) -> dict:
    """A fuse-train DCP checkpoint folder as the dict ``torch.load`` gives for ``last.pt``.

    Read by ckpttools' reader, which never runs a pickle (DCP's own loader unpickles ``.metadata`` and
    non-tensor items with plain pickle): refused if any pickle would run code or any CRC32 / size fails; the
    tensors are then loaded from the folder's bytes."""
    ckpt, _ = open_input(path, "resume from")
    return _as_saved(materialise(ckpt.tree))


def _as_saved(ckpt: dict) -> dict:
    """Undo what DCP's flattening changes in fuse-train's tree: dict keys come back as strings (the optimizer's
    per-parameter state and the class names are keyed by int) and empty dicts do not come back."""

    def int_keys(d: dict) -> dict:
        return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in d.items()}

    optimizer = ckpt.get(S.K_OPTIMIZER)
    if isinstance(optimizer, dict):
        optimizer["state"] = int_keys(optimizer.get("state") or {})
    resolved = ckpt.get(S.K_RESOLVED)
    if isinstance(resolved, dict) and isinstance(resolved.get("names"), dict):
        resolved["names"] = int_keys(resolved["names"])
    for key in (S.K_SCALER, S.K_METRICS):
        ckpt.setdefault(key, {})
    return ckpt
