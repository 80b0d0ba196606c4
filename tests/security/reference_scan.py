"""The scanner as it was before the fast opcode loop (pickletools.genops + one step function): kept as the
oracle the fast scanner is tested against (tests/security/test_scan_equivalence.py).  Not used by the tool."""

from __future__ import annotations

import pickletools
from typing import Any

from ckpttools.pickle.scan import _call, _call_value, _container
from ckpttools.pickle.scan_model import CONSTRUCTED, MARK, REFERENCED, UNKNOWN, Global, PickleScan, normalise


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


def reference_scan(data: bytes | memoryview, start: int = 0) -> PickleScan:
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


_CONSTANTS = {
    "INT",
    "BININT",
    "BININT1",
    "BININT2",
    "LONG",
    "LONG1",
    "LONG4",
    "NONE",
    "NEWTRUE",
    "NEWFALSE",
    "FLOAT",
    "BINFLOAT",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
    "BYTEARRAY8",
    "NEXT_BUFFER",
    "EMPTY_LIST",
    "EMPTY_DICT",
    "EMPTY_SET",
}
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}


def _step(name: str, arg: Any, stack: _Stack, memo: dict, result: PickleScan) -> None:
    if name in _CONSTANTS:
        stack.append(UNKNOWN)
    elif name in _STRINGS:
        stack.append(arg if isinstance(arg, str) else arg.decode("latin1"))
    elif name == "PROTO":
        result.protocol = int(arg)
    elif name in ("FRAME", "READONLY_BUFFER"):
        pass
    elif name == "MARK":
        stack.append(MARK)
    elif name == "EMPTY_TUPLE":
        stack.append(())
    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        n = int(name[-1])
        stack.append(tuple(stack.take(n)) if n > 1 else (stack.take(),))
    elif name == "TUPLE":
        stack.append(tuple(stack.pop_to_mark()))
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
        if not (isinstance(module, str) and isinstance(attr, str)):
            result.problems.append(
                "STACK_GLOBAL with a module or name computed at load time (cannot be judged without running the pickle)"
            )
            stack.append(UNKNOWN)
            return
        ref = normalise(module, attr)
        result.use(ref, REFERENCED)
        stack.append(Global(ref))
    elif name in ("EXT1", "EXT2", "EXT4"):
        result.problems.append(
            f"{name} extension code {arg}: resolved through copyreg's extension registry of the "
            "loading process, which a file cannot be checked against"
        )
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
        _call_value(func, args if isinstance(args, tuple) else (UNKNOWN,), name, result)
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
            result.problems.append(
                f"BUILD sets attributes on {target.ref.qualname} itself (monkey-patching a class "
                "or function of the loading process)"
            )
    elif name == "PERSID":
        stack.append(UNKNOWN)
    elif name == "BINPERSID":
        stack.take()
        stack.append(UNKNOWN)
    elif name == "STOP":
        stack.take()
    else:  # pragma: no cover - every opcode of protocols 0-5 is handled above
        raise ValueError(f"opcode {name} is not understood")
