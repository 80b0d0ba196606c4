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

import io
import pickletools
import struct
from typing import Any

from ckpttools.objects import Reference
from ckpttools.pickle.scan_model import (
    CALLED,
    CONSTRUCTED,
    MARK,
    REFERENCED,
    UNKNOWN,
    Call,
    Global,
    PickleScan,
    normalise,
)

PROTOCOL0_STARTS = frozenset(b"(]}).NIJKLMSTUVXcFGB\x80")  # first opcodes of text and binary pickles


def looks_like_pickle(data: bytes) -> bool:
    """Whether ``data`` opens with a pickle that can be followed to STOP (text protocols included)."""
    if not data or data[0] not in PROTOCOL0_STARTS:
        return False
    if data[0] == 0x80:
        return True
    scan = scan_pickle(data)
    return scan.error is None


def _pop_to_mark(stack: list) -> list:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is MARK:
            items = stack[i + 1 :]
            del stack[i:]
            return items
    raise ValueError("no MARK on the stack")


def _take(stack: list, n: int) -> list:
    if len(stack) < n:
        raise ValueError("stack underflow")
    items = stack[-n:]
    del stack[-n:]
    return items


def _pop(stack: list):
    if not stack:
        raise ValueError("stack underflow")
    return stack.pop()


# opcodes that push a value whose content never matters to the verdict, and how many argument bytes they carry
# (a fixed size, or the size of their length prefix: "<B" one byte, "<I" four, "<Q" eight)
_FIXED_CONSTANTS = {
    ord("K"): 1,
    ord("M"): 2,
    ord("J"): 4,
    ord("G"): 8,
    ord("N"): 0,
    0x88: 0,
    0x89: 0,
    ord("]"): 0,
    ord("}"): 0,
    0x8F: 0,
    0x97: 0,
}
_SIZED_CONSTANTS = {
    0x8A: "<B",
    0x8B: "<i",
    ord("B"): "<I",
    ord("C"): "<B",
    0x8E: "<Q",
    0x96: "<Q",
}  # LONG1, LONG4, BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
_SIZED_STRINGS = {
    ord("X"): ("<I", "utf-8"),
    0x8C: ("<B", "utf-8"),
    0x8D: ("<Q", "utf-8"),
    ord("T"): ("<i", "latin-1"),
    ord("U"): ("<B", "latin-1"),
}
_LEN = {fmt: struct.Struct(fmt) for fmt in ("<B", "<H", "<i", "<I", "<Q")}
_LINE_OPCODES = {code: pickletools.code2op[chr(code)] for code in b"IFLSVPgpci"}  # text arguments


def scan_pickle(data: bytes | memoryview, start: int = 0) -> PickleScan:
    """Scan the pickle that starts at ``start`` of ``data`` up to its STOP.

    One loop over the opcodes with the common ones decoded in place (a torch state dict of 200,000 tensors is
    six million opcodes); the text-line opcodes of protocol 0 go through pickletools' own argument readers.
    Its verdicts are those of the step-by-step model it replaced (an equivalence test holds them equal)."""
    result = PickleScan()
    buf = bytes(memoryview(data)[start:]) if start else bytes(data)
    try:
        result.end = start + _walk(buf, result)
    except Exception as exc:  # noqa: BLE001 - malformed or hostile opcode streams are findings
        result.error = f"{exc.__class__.__name__}: {exc}"
    return result


def _need(buf: bytes, pos: int, n: int, what: str) -> None:
    if n < 0 or pos + n > len(buf):
        raise ValueError(f"expected {n} bytes in {what}, but only {max(0, len(buf) - pos)} remain")


class _Memo:
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


def _walk(buf: bytes, result: PickleScan) -> int:
    """Model every opcode on the stack; returns the offset just after STOP."""
    stack: list = []
    memo = _Memo()
    seq, other = memo.seq, memo.other  # the common cases inline below: key == len(seq), nothing out of order
    called_plainly: dict[int, Global] = {}
    push, size, pos = stack.append, len(buf), 0
    uint4 = _LEN["<I"].unpack_from
    fixed, sized, strings = _FIXED_CONSTANTS, _SIZED_CONSTANTS, _SIZED_STRINGS
    while True:
        if pos >= size:
            raise ValueError("pickle exhausted before seeing STOP")
        op = buf[pos]
        pos += 1
        if op == 0x72:  # LONG_BINPUT (in order of how often torch's pickles use them)
            if not stack:
                raise IndexError("list index out of range")
            key = uint4(buf, pos)[0]  # struct.error when cut off
            if key == len(seq) and not other:
                seq.append(stack[-1])
            else:
                memo.put(key, stack[-1])
            pos += 4
        elif op == 0x71:  # BINPUT
            if pos >= size:
                raise ValueError("pickle exhausted in BINPUT")
            if not stack:
                raise IndexError("list index out of range")
            memo.put(buf[pos], stack[-1])
            pos += 1
        elif op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
            n = 1 if op == 0x68 else 4
            if pos + n > size:
                raise ValueError("pickle exhausted in GET")
            key = buf[pos] if n == 1 else uint4(buf, pos)[0]
            pos += n
            push(seq[key] if key < len(seq) else memo.get(key))
        elif op == 0x4B:  # BININT1
            pos += 1
            if pos > size:
                raise ValueError("pickle exhausted in BININT1")
            push(UNKNOWN)
        elif op == 0x28:  # MARK
            push(MARK)
        elif op in strings:
            fmt, encoding = strings[op]
            length = _LEN[fmt]
            n = length.unpack_from(buf, pos)[0]  # struct.error when the length itself is cut off
            pos += length.size
            if n < 0 or pos + n > size:
                raise ValueError(f"string of {n} bytes, {size - pos} remain")
            push(buf[pos : pos + n].decode(encoding, "surrogatepass" if encoding == "utf-8" else "strict"))
            pos += n
        elif op in fixed:
            n = fixed[op]
            pos += n
            if pos > size:
                raise ValueError("pickle exhausted in an argument")
            push(UNKNOWN)
        elif op == 0x74:  # TUPLE
            push(tuple(_pop_to_mark(stack)))
        elif op == 0x85:  # TUPLE1
            push((_pop(stack),))
        elif op == 0x86 or op == 0x87:  # TUPLE2, TUPLE3
            push(tuple(_take(stack, op - 0x84)))
        elif op == 0x29:  # EMPTY_TUPLE
            push(())
        elif op == 0x52:  # REDUCE
            args = _pop(stack)
            func = _pop(stack)
            if id(func) not in called_plainly:  # the same global object called again: recorded once already
                _call_value(func, args if isinstance(args, tuple) else (UNKNOWN,), "REDUCE", result)
                if isinstance(func, Global) and func.ref not in ARGUMENT_CHECKED:
                    called_plainly[id(func)] = func  # kept alive, so its id is never reused meanwhile
            push(UNKNOWN)
        elif op == 0x51:  # BINPERSID
            _pop(stack)
            push(UNKNOWN)
        elif op == 0x75 or op == 0x65 or op == 0x90:  # SETITEMS, APPENDS, ADDITEMS
            _pop_to_mark(stack)
            _container(_pop(stack), {0x75: "SETITEMS", 0x65: "APPENDS", 0x90: "ADDITEMS"}[op], result)
            push(UNKNOWN)
        elif op == 0x73:  # SETITEM
            _take(stack, 2)
            _container(_pop(stack), "SETITEM", result)
            push(UNKNOWN)
        elif op == 0x61:  # APPEND
            _pop(stack)
            _container(_pop(stack), "APPEND", result)
            push(UNKNOWN)
        elif op == 0x62:  # BUILD
            _pop(stack)
            target = stack[-1] if stack else None
            if isinstance(target, Global):
                result.problems.append(
                    f"BUILD sets attributes on {target.ref.qualname} itself (monkey-patching a "
                    "class or function of the loading process)"
                )
        elif op == 0x94:  # MEMOIZE
            if not stack:
                raise IndexError("list index out of range")
            memo.put(len(memo), stack[-1])
        elif op in sized:
            length = _LEN[sized[op]]
            _need(buf, pos, length.size, "a length")
            n = length.unpack_from(buf, pos)[0]
            pos += length.size
            if n < 0:
                raise ValueError(f"byte count < 0: {n}")
            _need(buf, pos, n, "a value")
            pos += n
            push(UNKNOWN)
        elif op == 0x2E:  # STOP
            _pop(stack)
            return pos
        else:
            pos = _rare(op, buf, pos, stack, memo, result)


def _rare(op: int, buf: bytes, pos: int, stack: list, memo: _Memo, result: PickleScan) -> int:
    """Opcodes a torch checkpoint seldom or never uses; returns the new position."""
    if op in _LINE_OPCODES:
        return _text_opcode(op, buf, pos, stack, memo, result)
    if op == 0x80:  # PROTO
        _need(buf, pos, 1, "PROTO")
        result.protocol = buf[pos]
        return pos + 1
    if op == 0x95:  # FRAME
        _need(buf, pos, 8, "FRAME")
        return pos + 8
    if op == 0x98:  # READONLY_BUFFER
        return pos
    if op == 0x93:  # STACK_GLOBAL
        attr, module = _pop(stack), _pop(stack)
        if not (isinstance(module, str) and isinstance(attr, str)):
            result.problems.append(
                "STACK_GLOBAL with a module or name computed at load time (cannot be judged without running the pickle)"
            )
            stack.append(UNKNOWN)
            return pos
        ref = normalise(module, attr)
        result.use(ref, REFERENCED)
        stack.append(Global(ref))
        return pos
    if op in (0x82, 0x83, 0x84):  # EXT1, EXT2, EXT4
        n = {0x82: 1, 0x83: 2, 0x84: 4}[op]
        _need(buf, pos, n, "EXT")
        code = int.from_bytes(buf[pos : pos + n], "little", signed=n == 4)
        name = {0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4"}[op]
        result.problems.append(
            f"{name} extension code {code}: resolved through copyreg's extension registry of the "
            "loading process, which a file cannot be checked against"
        )
        stack.append(UNKNOWN)
        return pos + n
    if op in (0x6C, 0x64, 0x91):  # LIST, DICT, FROZENSET
        _pop_to_mark(stack)
        stack.append(UNKNOWN)
        return pos
    if op == 0x6F:  # OBJ
        items = _pop_to_mark(stack)
        if not items:
            raise ValueError("OBJ without a class")
        _call_value(items[0], tuple(items[1:]), "OBJ", result)
        stack.append(UNKNOWN)
        return pos
    if op in (0x81, 0x92):  # NEWOBJ, NEWOBJ_EX
        name = "NEWOBJ" if op == 0x81 else "NEWOBJ_EX"
        if op == 0x92:
            _pop(stack)
        _pop(stack)
        cls = _pop(stack)
        if isinstance(cls, Global):
            result.use(cls.ref, CONSTRUCTED)
        else:
            result.problems.append(f"{name} of a class computed at load time")
        stack.append(UNKNOWN)
        return pos
    if op == 0x30:  # POP
        _pop(stack)
        return pos
    if op == 0x31:  # POP_MARK
        _pop_to_mark(stack)
        return pos
    if op == 0x32:  # DUP
        stack.append(stack[-1])
        return pos
    raise ValueError(f"at position {pos - 1}, opcode {bytes([op])!r} unknown")


def _text_opcode(op: int, buf: bytes, pos: int, stack: list, memo: _Memo, result: PickleScan) -> int:
    """The protocol-0 opcodes whose argument is a line of text (INT, STRING, GET, GLOBAL, INST, ...)."""
    f = io.BytesIO(buf)
    f.seek(pos)
    arg = _LINE_OPCODES[op].arg.reader(f)
    pos = f.tell()
    name = _LINE_OPCODES[op].name
    if name in ("INT", "LONG", "FLOAT"):
        stack.append(UNKNOWN)
    elif name in ("STRING", "UNICODE"):
        stack.append(arg if isinstance(arg, str) else arg.decode("latin1"))
    elif name == "PERSID":
        stack.append(UNKNOWN)
    elif name == "GET":
        stack.append(memo.get(int(arg)))
    elif name == "PUT":
        if not stack:
            raise IndexError("list index out of range")
        memo.put(int(arg), stack[-1])
    elif name == "GLOBAL":
        module, _, attr = arg.partition(" ")
        ref = normalise(module, attr)
        result.use(ref, REFERENCED)
        stack.append(Global(ref))
    elif name == "INST":
        module, _, attr = arg.partition(" ")
        _call(normalise(module, attr), tuple(_pop_to_mark(stack)), "INST", result)
        stack.append(UNKNOWN)
    return pos


def _container(target: Any, op: str, result: PickleScan) -> None:
    if isinstance(target, Global):  # e.g. APPENDS onto a global: calls its extend/append/__setitem__
        result.problems.append(f"{op} applied to {target.ref.qualname} itself (calls its methods)")


def _call_value(func: Any, args: tuple, op: str, result: PickleScan) -> None:
    if isinstance(func, Global):
        _call(func.ref, args, op, result)
    else:
        result.problems.append(f"{op} calls a value computed at load time (the result of another call)")


# the callables whose arguments decide their verdict (policy.ARGUMENT_RULES; a test holds the two equal): only
# their calls are kept with arguments -- a torch state dict calls _rebuild_tensor_v2 once per tensor
ARGUMENT_CHECKED = frozenset(
    {
        Reference("copyreg", "_reconstructor"),
        Reference("copyreg", "__newobj__"),
        Reference("torch._tensor", "_rebuild_from_type_v2"),
        Reference("_codecs", "encode"),
    }
)


def _call(ref: Reference, args: tuple, op: str, result: PickleScan) -> None:
    result.use(ref, CALLED)
    if ref in ARGUMENT_CHECKED:
        result.calls.append(Call(ref, args, op))
