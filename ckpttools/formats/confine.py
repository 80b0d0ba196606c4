"""Paths named *inside* a checkpoint folder (DCP ``.metadata``'s relative paths, a Hugging Face index's shard
names) stay inside that folder.

A folder's metadata is data from whoever made the folder.  torch's own ``dcp.load`` and Transformers follow
such names wherever they point, so a folder can make them read another folder's tensors (a false "verified",
or a conversion that copies someone else's data).  Our readers resolve every such name here first and read
nothing that is not inside: no absolute path, no ``..`` component, no symlink whose target is outside.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


def inside(folder: Path, name: str) -> Path | None:
    """``folder / name`` when it names a place inside ``folder`` (symlinks resolved), else None."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return None
    if os.path.isabs(name) or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        return None
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return None
    candidate = folder / name
    root = folder.resolve()
    real = candidate.resolve()
    if real != root and root not in real.parents:
        return None
    return candidate
