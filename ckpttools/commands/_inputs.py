"""How the commands that write (convert, remap, repair) open their input: through the one reader, with the
one safety policy, refusing damaged or unsafe inputs with one line that says what to run instead."""

from __future__ import annotations

from pathlib import Path

from ckpttools.errors import DamagedInput, FormatLimit, UnsafeInput
from ckpttools.formats.registry import Checkpoint, open_checkpoint
from ckpttools.report import ERROR, counted
from ckpttools.trees import depth_of

# containers nested deeper than this are refused by the commands that write: pickle itself (torch.save
# included) stops near 1,000 levels, so no genuine checkpoint comes close; a hand-made one would only make
# every writer fail with a recursion error
MAX_WRITE_DEPTH = 500


def refuse_unsafe(ckpt: Checkpoint, what: str, allow_unsafe: bool = False) -> list[str]:
    """Raise UnsafeInput if any pickle of ``ckpt`` has a dangerous reference, unless ``allow_unsafe``; returns
    the dangerous references (the caller then writes data only, never those references)."""
    dangerous = list(dict.fromkeys(j.reference for _, j in ckpt.dangerous()))
    if dangerous and not allow_unsafe:
        shown = ", ".join(dangerous[:3]) + (f" and {len(dangerous) - 3} more" if len(dangerous) > 3 else "")
        raise UnsafeInput(
            f"{ckpt.path}: its pickle would run code ({shown}); refusing to {what} it (see `ckpt "
            f"verify {ckpt.path}`; --allow-unsafe writes its tensors only)"
        )
    return dangerous


def require_intact(ckpt: Checkpoint) -> None:
    """Raise DamagedInput for a checkpoint with container errors or nothing readable."""
    errors = [f for f in ckpt.findings if f.severity == ERROR]
    unknown = [f for f in errors if f.code == "tensor.unknown-dtype"]
    if unknown and len(unknown) == len(errors):  # a limit of this version, not damage: repair would not help
        raise FormatLimit(f"{ckpt.path}: {unknown[0].message}; nothing written")
    if errors or ckpt.tree is None:
        first = errors[0].message if errors else "nothing could be read"
        raise DamagedInput(
            f"{ckpt.path}: damaged ({counted(len(errors), 'problem')}, first: {first}); "
            "run `ckpt verify` / `ckpt repair` first"
        )


def open_input(path: Path, what: str, allow_unsafe: bool = False) -> tuple[Checkpoint, list[str]]:
    """Open ``path`` for a command that writes from it: safe (or explicitly allowed) and intact.
    Returns the checkpoint and the dangerous references it holds (empty unless ``allow_unsafe``)."""
    ckpt = open_checkpoint(path)
    dangerous = refuse_unsafe(ckpt, what, allow_unsafe)
    require_intact(ckpt)
    refuse_deep(ckpt, what)
    return ckpt, dangerous


def refuse_deep(ckpt: Checkpoint, what: str) -> None:
    if depth_of(ckpt.tree, stop_at=MAX_WRITE_DEPTH + 1) > MAX_WRITE_DEPTH:
        raise FormatLimit(
            f"{ckpt.path}: containers nested more than {MAX_WRITE_DEPTH} levels deep; refusing to "
            f"{what} it (torch.save itself cannot write such a file)"
        )
