"""What the scan of a pickle finds, as values: the references it uses and how (called, constructed,
referenced), the calls with their symbolic arguments, what could not be judged, and the stack values of the
model (``scan.py`` walks the opcodes; ``policy.py`` judges the result; a child process sends it back pickled).
"""

from __future__ import annotations

import _compat_pickle
from dataclasses import dataclass, field

from ckpttools.objects import Reference

CALLED, CONSTRUCTED, REFERENCED = "called", "constructed", "referenced"


@dataclass(frozen=True)
class Global:
    ref: Reference


# STACK VALUES of the model: a Global (a name the pickle fetched), a str (a text constant), a tuple (built by
# TUPLE opcodes, of stack values), UNKNOWN (any other value: numbers, bytes, containers, results of calls) and
# MARK.  Plain str and tuple rather than wrappers: a torch state dict pushes a million of them, and the memo
# keeps them all (the scan's time and memory are mostly these objects).


class _Sentinel:
    """A stack value of the model; pickled by name, so a scan sent from a child process keeps its identity."""

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return self.name

    def __repr__(self):
        return self.name


MARK, UNKNOWN = _Sentinel("MARK"), _Sentinel("UNKNOWN")


@dataclass
class Call:
    """One call the pickle makes: the callable's reference and the symbolic arguments."""

    ref: Reference
    args: tuple  # of Global / str / tuple / UNKNOWN (see STACK VALUES)
    opcode: str


@dataclass
class PickleScan:
    protocol: int = 0
    uses: dict[Reference, set[str]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what makes the pickle unjudgeable: always unsafe
    error: str | None = None  # the opcode stream could not be followed to STOP
    end: int = 0  # offset just after STOP

    @property
    def references(self) -> list[Reference]:
        return list(self.uses)

    def use(self, ref: Reference, how: str) -> None:
        self.uses.setdefault(ref, set()).add(how)


def normalise(module: str, name: str) -> Reference:
    """The reference Python 3's unpickler resolves (``fix_imports``: Python 2 names -> Python 3 names)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return Reference(module, name)


# THE STACK AND MEMO OPERATIONS of the model, raising as the unpickler does on a malformed stream


def pop_to_mark(stack: list) -> list:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is MARK:
            items = stack[i + 1 :]
            del stack[i:]
            return items
    raise ValueError("no MARK on the stack")


def take(stack: list, n: int) -> list:
    if len(stack) < n:
        raise ValueError("stack underflow")
    items = stack[-n:]
    del stack[-n:]
    return items


def pop(stack: list):
    if not stack:
        raise ValueError("stack underflow")
    return stack.pop()


def need(buf: bytes, pos: int, n: int, what: str) -> None:
    if n < 0 or pos + n > len(buf):
        raise ValueError(f"expected {n} bytes in {what}, but only {max(0, len(buf) - pos)} remain")


class Memo:
    """The unpickler's memo (key -> value) as pickles use it: the keys 0, 1, 2, ... in order in a list (a torch
    state dict of 200,000 tensors writes 1.6 million of them: 13 MB as a list, over 100 MB as a dict), any other
    key in a dict.  The list never has holes; a key in both is the list's (written later)."""

    __slots__ = ("seq", "other", "uncovered")

    def __init__(self):
        self.seq: list = []
        self.other: dict = {}
        self.uncovered = 0  # keys of ``other`` the list has not reached: len(memo) = len(seq) + uncovered

    def __len__(self) -> int:
        return len(self.seq) + self.uncovered

    def put(self, key: int, value) -> None:
        seq, other = self.seq, self.other
        if 0 <= key < len(seq):
            seq[key] = value
        elif key == len(seq):
            if key in other:
                self.uncovered -= 1
            seq.append(value)
        else:
            if key not in other:
                self.uncovered += 1
            other[key] = value

    def get(self, key: int):
        if 0 <= key < len(self.seq):
            return self.seq[key]
        if key in self.other:
            return self.other[key]
        raise ValueError(f"memo key {key} read before it was written")
