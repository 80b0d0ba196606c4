"""What a pickle would do when loaded, found by walking its opcodes on a model of the unpickler's stack.

Nothing the pickle names is imported.  For every global (GLOBAL, INST, STACK_GLOBAL, also when fetched again
from the memo) the scan records how the pickle *uses* it:

* ``called``: REDUCE, INST or OBJ call it with arguments (``os.system('...')``);
* ``constructed``: NEWOBJ / NEWOBJ_EX build an instance with ``cls.__new__`` (how pickled ``nn.Module``s and
  dataclasses appear);
* ``referenced``: only pushed (stored as a value; loading still imports its module).

It also records what cannot be judged statically: EXT1/2/4 (names resolved through a registry of the loading
process), STACK_GLOBAL whose operands are not string constants, REDUCE of a value computed at load time,
BUILD applied to a global (which sets attributes on a class or function), and opcodes the stack model cannot
follow.  Names are normalised the way ``pickle`` does for old protocols (``__builtin__`` -> ``builtins``).
"""

from __future__ import annotations

import _compat_pickle
import pickletools
from dataclasses import dataclass, field
from typing import Any

from ckpttools.objects import Reference

CALLED, CONSTRUCTED, REFERENCED = "called", "constructed", "referenced"
PROTOCOL0_STARTS = frozenset(b"(]}).NIJKLMSTUVXcFGB\x80")  # first opcodes of text and binary pickles


@dataclass(frozen=True)
class Global:
    ref: Reference


@dataclass(frozen=True)
class Text:
    value: str


@dataclass(frozen=True)
class Tuple:
    items: tuple


class _Mark:
    pass


MARK, UNKNOWN = _Mark(), object()


@dataclass
class Call:
    """One call the pickle makes: the callable's reference and the symbolic arguments."""

    ref: Reference
    args: tuple  # of Global / Text / Tuple / UNKNOWN
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


class _Stack(list):
    def pop_to_mark(self) -> list:
        items = []
        while self:
            top = super().pop()
            if top is MARK:
                items.reverse()
                return items
            items.append(top)
        raise ValueError("no MARK on the stack")

    def take(self, n: int = 1):
        if len(self) < n:
            raise ValueError("stack underflow")
        if n == 1:
            return super().pop()
        items = self[-n:]
        del self[-n:]
        return items


def scan_pickle(data: bytes | memoryview, start: int = 0) -> PickleScan:
    """Scan the pickle that starts at ``start`` of ``data`` up to its STOP."""
    result = PickleScan()
    stack, memo = _Stack(), {}
    try:
        for op, arg, pos in pickletools.genops(bytes(memoryview(data)[start:]) if start else bytes(data)):
            _step(op.name, arg, stack, memo, result)
            if op.name == "STOP":
                result.end = start + pos + 1
                return result
        result.error = "the pickle ends without STOP"
    except Exception as exc:  # noqa: BLE001 - malformed or hostile opcode streams are findings
        result.error = f"{exc.__class__.__name__}: {exc}"
    return result


def looks_like_pickle(data: bytes) -> bool:
    """Whether ``data`` opens with a pickle that can be followed to STOP (text protocols included)."""
    if not data or data[0] not in PROTOCOL0_STARTS:
        return False
    if data[0] == 0x80:
        return True
    scan = scan_pickle(data)
    return scan.error is None


_CONSTANTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "NONE", "NEWTRUE", "NEWFALSE",
              "FLOAT", "BINFLOAT", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NEXT_BUFFER",
              "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"}
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}


def _step(name: str, arg: Any, stack: _Stack, memo: dict, result: PickleScan) -> None:
    if name in _CONSTANTS:
        stack.append(UNKNOWN)
    elif name in _STRINGS:
        stack.append(Text(arg if isinstance(arg, str) else arg.decode("latin1")))
    elif name == "PROTO":
        result.protocol = int(arg)
    elif name in ("FRAME", "READONLY_BUFFER"):
        pass
    elif name == "MARK":
        stack.append(MARK)
    elif name == "EMPTY_TUPLE":
        stack.append(Tuple(()))
    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        n = int(name[-1])
        stack.append(Tuple(tuple(stack.take(n)) if n > 1 else (stack.take(),)))
    elif name == "TUPLE":
        stack.append(Tuple(tuple(stack.pop_to_mark())))
    elif name in ("LIST", "DICT", "FROZENSET"):
        stack.pop_to_mark()
        stack.append(UNKNOWN)
    elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
        stack.pop_to_mark()
        _container(stack.take(), name, result)
        stack.append(UNKNOWN)
    elif name == "APPEND":
        stack.take()
        _container(stack.take(), name, result)
        stack.append(UNKNOWN)
    elif name == "SETITEM":
        stack.take(2)
        _container(stack.take(), name, result)
        stack.append(UNKNOWN)
    elif name == "POP":
        stack.take()
    elif name == "POP_MARK":
        stack.pop_to_mark()
    elif name == "DUP":
        stack.append(stack[-1])
    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
        memo[int(arg)] = stack[-1]
    elif name == "MEMOIZE":
        memo[len(memo)] = stack[-1]
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        if int(arg) not in memo:
            raise ValueError(f"memo key {arg} read before it was written")
        stack.append(memo[int(arg)])
    elif name == "GLOBAL":
        module, _, attr = arg.partition(" ")
        ref = normalise(module, attr)
        result.use(ref, REFERENCED)
        stack.append(Global(ref))
    elif name == "STACK_GLOBAL":
        attr, module = stack.take(), stack.take()
        if not (isinstance(module, Text) and isinstance(attr, Text)):
            result.problems.append("STACK_GLOBAL with a module or name computed at load time (cannot be judged "
                                   "without running the pickle)")
            stack.append(UNKNOWN)
            return
        ref = normalise(module.value, attr.value)
        result.use(ref, REFERENCED)
        stack.append(Global(ref))
    elif name in ("EXT1", "EXT2", "EXT4"):
        result.problems.append(f"{name} extension code {arg}: resolved through copyreg's extension registry of the "
                               "loading process, which a file cannot be checked against")
        stack.append(UNKNOWN)
    elif name == "INST":
        module, _, attr = arg.partition(" ")
        ref = normalise(module, attr)
        _call(ref, tuple(stack.pop_to_mark()), name, result)
        stack.append(UNKNOWN)
    elif name == "OBJ":
        items = stack.pop_to_mark()
        if not items:
            raise ValueError("OBJ without a class")
        _call_value(items[0], tuple(items[1:]), name, result)
        stack.append(UNKNOWN)
    elif name == "REDUCE":
        args = stack.take()
        func = stack.take()
        _call_value(func, args.items if isinstance(args, Tuple) else (UNKNOWN,), name, result)
        stack.append(UNKNOWN)
    elif name in ("NEWOBJ", "NEWOBJ_EX"):
        if name == "NEWOBJ_EX":
            stack.take()
        stack.take()
        cls = stack.take()
        if isinstance(cls, Global):
            result.use(cls.ref, CONSTRUCTED)
        else:
            result.problems.append(f"{name} of a class computed at load time")
        stack.append(UNKNOWN)
    elif name == "BUILD":
        stack.take()
        target = stack[-1] if stack else None
        if isinstance(target, Global):
            result.problems.append(f"BUILD sets attributes on {target.ref.qualname} itself (monkey-patching a class "
                                   "or function of the loading process)")
    elif name == "PERSID":
        stack.append(UNKNOWN)
    elif name == "BINPERSID":
        stack.take()
        stack.append(UNKNOWN)
    elif name == "STOP":
        stack.take()
    else:  # pragma: no cover - every opcode of protocols 0-5 is handled above
        raise ValueError(f"opcode {name} is not understood")


def _container(target: Any, op: str, result: PickleScan) -> None:
    if isinstance(target, Global):  # e.g. APPENDS onto a global: calls its extend/append/__setitem__
        result.problems.append(f"{op} applied to {target.ref.qualname} itself (calls its methods)")


def _call_value(func: Any, args: tuple, op: str, result: PickleScan) -> None:
    if isinstance(func, Global):
        _call(func.ref, args, op, result)
    else:
        result.problems.append(f"{op} calls a value computed at load time (the result of another call)")


def _call(ref: Reference, args: tuple, op: str, result: PickleScan) -> None:
    result.use(ref, CALLED)
    result.calls.append(Call(ref, args, op))
