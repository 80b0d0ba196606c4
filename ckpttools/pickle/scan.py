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
    Memo,
    PickleScan,
    need,
    normalise,
    pop,
    pop_to_mark,
    take,
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


def _walk(buf: bytes, result: PickleScan) -> int:
    """Model every opcode on the stack; returns the offset just after STOP."""
    stack: list = []
    memo = Memo()
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
        elif op == 0x28:  # MARK
            push(MARK)
        elif op in fixed:  # BININT1 most often
            pos += fixed[op]
            if pos > size:
                raise ValueError("pickle exhausted in an argument")
            push(UNKNOWN)
        elif op in strings:
            fmt, encoding = strings[op]
            length = _LEN[fmt]
            n = length.unpack_from(buf, pos)[0]  # struct.error when the length itself is cut off
            pos += length.size
            if n < 0 or pos + n > size:
                raise ValueError(f"string of {n} bytes, {size - pos} remain")
            push(buf[pos : pos + n].decode(encoding, "surrogatepass" if encoding == "utf-8" else "strict"))
            pos += n
        elif op == 0x74:  # TUPLE
            push(tuple(pop_to_mark(stack)))
        elif op == 0x85:  # TUPLE1
            push((pop(stack),))
        elif op == 0x86 or op == 0x87:  # TUPLE2, TUPLE3
            push(tuple(take(stack, op - 0x84)))
        elif op == 0x29:  # EMPTY_TUPLE
            push(())
        elif op == 0x52:  # REDUCE
            _reduce(stack, result, called_plainly)
        elif op == 0x51:  # BINPERSID
            pop(stack)
            push(UNKNOWN)
        elif op == 0x94:  # MEMOIZE
            if not stack:
                raise IndexError("list index out of range")
            memo.put(len(memo), stack[-1])
        elif op in sized:
            pos = _skip_sized(sized[op], buf, pos)
            push(UNKNOWN)
        elif op == 0x2E:  # STOP
            pop(stack)
            return pos
        elif op in _EFFECTS:
            _effect(op, stack, result)
        else:
            pos = _rare(op, buf, pos, stack, memo, result)


def _skip_sized(fmt: str, buf: bytes, pos: int) -> int:
    """Past a length-prefixed value whose content never matters (bytes, a long integer); returns the new position."""
    length = _LEN[fmt]
    need(buf, pos, length.size, "a length")
    n = length.unpack_from(buf, pos)[0]
    pos += length.size
    if n < 0:
        raise ValueError(f"byte count < 0: {n}")
    need(buf, pos, n, "a value")
    return pos + n


def _reduce(stack: list, result: PickleScan, called_plainly: dict[int, Global]) -> None:
    """REDUCE: ``func(*args)``; a global called again with no argument rule is recorded once."""
    args = pop(stack)
    func = pop(stack)
    if id(func) not in called_plainly:
        _call_value(func, args if isinstance(args, tuple) else (UNKNOWN,), "REDUCE", result)
        if isinstance(func, Global) and func.ref not in ARGUMENT_CHECKED:
            called_plainly[id(func)] = func  # kept alive, so its id is never reused meanwhile
    stack.append(UNKNOWN)


_EFFECTS = {0x75: "SETITEMS", 0x65: "APPENDS", 0x90: "ADDITEMS", 0x73: "SETITEM", 0x61: "APPEND", 0x62: "BUILD"}


def _effect(op: int, stack: list, result: PickleScan) -> None:
    """The opcodes that fill a container or set an object's state: harmless on a built value, a finding when
    applied to a global itself (they call its methods or set its attributes)."""
    if op == 0x62:  # BUILD
        pop(stack)
        target = stack[-1] if stack else None
        if isinstance(target, Global):
            result.problems.append(
                f"BUILD sets attributes on {target.ref.qualname} itself (monkey-patching a "
                "class or function of the loading process)"
            )
        return
    if op == 0x73:  # SETITEM
        take(stack, 2)
    elif op == 0x61:  # APPEND
        pop(stack)
    else:  # SETITEMS, APPENDS, ADDITEMS
        pop_to_mark(stack)
    _container(pop(stack), _EFFECTS[op], result)
    stack.append(UNKNOWN)


def _rare(op: int, buf: bytes, pos: int, stack: list, memo: Memo, result: PickleScan) -> int:
    """Opcodes a torch checkpoint seldom or never uses; returns the new position."""
    if op in _LINE_OPCODES:
        return _text_opcode(op, buf, pos, stack, memo, result)
    if op == 0x80:  # PROTO
        need(buf, pos, 1, "PROTO")
        result.protocol = buf[pos]
        return pos + 1
    if op == 0x95:  # FRAME
        need(buf, pos, 8, "FRAME")
        return pos + 8
    if op == 0x98:  # READONLY_BUFFER
        return pos
    if op == 0x93:  # STACK_GLOBAL
        attr, module = pop(stack), pop(stack)
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
        need(buf, pos, n, "EXT")
        code = int.from_bytes(buf[pos : pos + n], "little", signed=n == 4)
        name = {0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4"}[op]
        result.problems.append(
            f"{name} extension code {code}: resolved through copyreg's extension registry of the "
            "loading process, which a file cannot be checked against"
        )
        stack.append(UNKNOWN)
        return pos + n
    if op in (0x6C, 0x64, 0x91):  # LIST, DICT, FROZENSET
        pop_to_mark(stack)
        stack.append(UNKNOWN)
        return pos
    if op == 0x6F:  # OBJ
        items = pop_to_mark(stack)
        if not items:
            raise ValueError("OBJ without a class")
        _call_value(items[0], tuple(items[1:]), "OBJ", result)
        stack.append(UNKNOWN)
        return pos
    if op in (0x81, 0x92):  # NEWOBJ, NEWOBJ_EX
        name = "NEWOBJ" if op == 0x81 else "NEWOBJ_EX"
        if op == 0x92:
            pop(stack)
        pop(stack)
        cls = pop(stack)
        if isinstance(cls, Global):
            result.use(cls.ref, CONSTRUCTED)
        else:
            result.problems.append(f"{name} of a class computed at load time")
        stack.append(UNKNOWN)
        return pos
    if op == 0x30:  # POP
        pop(stack)
        return pos
    if op == 0x31:  # POP_MARK
        pop_to_mark(stack)
        return pos
    if op == 0x32:  # DUP
        stack.append(stack[-1])
        return pos
    raise ValueError(f"at position {pos - 1}, opcode {bytes([op])!r} unknown")


def _text_opcode(op: int, buf: bytes, pos: int, stack: list, memo: Memo, result: PickleScan) -> int:
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
        _call(normalise(module, attr), tuple(pop_to_mark(stack)), "INST", result)
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
