"""torch's global names (rebuild functions, storage classes, dtypes) written by the C pickler without importing
torch.

The C pickler writes a global only after importing its module and checking that the name gives back the very
object it was handed, so naming ``torch._utils._rebuild_tensor_v2`` that way imports torch: a second and
~200 MB for a command that never runs torch (`ckpt convert` of a state dict).  Instead it is handed a stand-in
class of this module (``g0``, ``g1``, ...), which it writes as ``GLOBAL ckpttools.formats.torch_names gN`` and
memoizes (each stand-in once per pickle); ``to_torch_names`` then puts torch's name in its place.  The rewrite
is exact or declined: when this module's name occurs in the bytes other than once per stand-in written (a string
of the checkpoint that happens to contain it), it returns None and the caller pickles with names instead.
"""

from __future__ import annotations

_STANDINS: dict[tuple[str, str], type] = {}  # (torch module, name) -> its stand-in
_NAMES: dict[bytes, bytes] = {}  # stand-in GLOBAL opcode -> torch's GLOBAL opcode
_GLOBAL = b"c" + __name__.encode() + b"\n"  # protocol 2 writes a global as "c<module>\n<name>\n"


def standin(module: str, name: str) -> type:
    """The stand-in class that the C pickler will write in place of ``module.name``."""
    found = _STANDINS.get((module, name))
    if found is None:
        attr = f"g{len(_STANDINS)}"
        found = type(attr, (), {"__module__": __name__, "__qualname__": attr})
        globals()[attr] = found  # the C pickler looks it up here by name and checks it is the same object
        _STANDINS[module, name] = found
        _NAMES[_GLOBAL + attr.encode() + b"\n"] = f"c{module}\n{name}\n".encode()
    return found


def to_torch_names(data: bytes, written: int) -> bytes | None:
    """``data`` with each stand-in's GLOBAL opcode replaced by torch's; ``written``: how many distinct
    stand-ins the pickle holds.  None if this module's name occurs anywhere else in ``data``."""
    pieces = data.split(_GLOBAL)
    if len(pieces) - 1 != written:
        return None
    out = [pieces[0]]
    for piece in pieces[1:]:
        attr, newline, rest = piece.partition(b"\n")
        real = _NAMES.get(_GLOBAL + attr + newline)
        if real is None:
            return None
        out += (real, rest)
    return b"".join(out)
