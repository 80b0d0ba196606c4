"""THE safety policy: which globals a checkpoint's pickle may name, and what every other one means.

One exact table, ``ALLOWED``: (module, name) -> why loading it is safe.  No prefixes, no wildcards.  Every
reader and every command asks ``judge`` (through ``judge_scans``); nothing else in the package decides.

For a reference that is not on the table:

* the pickle **calls** it (REDUCE / INST / OBJ, or through an allowed function that calls its argument):
  **dangerous** -- ``torch.load(weights_only=False)`` would run it with the file's arguments;
* it belongs to a module whose import or use is an attack (``os``, ``subprocess``, ``builtins`` other than
  the allowed types, ...), or its dotted name walks through such a module or a dunder: **dangerous**;
* it is only **constructed** (NEWOBJ, the way pickled ``nn.Module``s and dataclasses appear) or only
  **referenced**: **code** -- a warning naming the library the file needs; read here as an inert placeholder.

Arguments matter where they decide safety: ``copyreg._reconstructor(cls, base, state)`` runs
``base.__init__`` unless ``base`` is ``object``; ``torch._tensor._rebuild_from_type_v2(func, ...)`` calls
``func``; ``_codecs.encode`` is allowed only for text encodings.  Whatever the scan could not follow (EXT
codes, names computed at load time, BUILD on a global, an opcode stream that breaks off) is dangerous: a
file that cannot be shown safe is not called safe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ckpttools.objects import Reference
from ckpttools.pickle.scan import CALLED, CONSTRUCTED, Call, Global, PickleScan
from ckpttools.tensors import DTYPES, TORCH_ALIASES

ALLOWED_STATUS, CODE, DANGEROUS = "allowed", "code", "dangerous"

TENSOR_REBUILD = "torch's own tensor rebuild; rebuilt here as a lazy tensor description (no torch code runs)"
DTYPE = "a torch dtype or legacy storage type: a name, nothing is called"
DCP_METADATA = (
    "a torch.distributed.checkpoint metadata dataclass: plain fields, no custom construction; "
    "read here as an inert record"
)
NUMPY = "numpy's array / scalar / dtype reconstruction from bytes and a dtype description"
BUILTIN_TYPE = "a builtin container or scalar type: builds data from data"
STDLIB_VALUE = "a standard-library value type: {what}; builds a value from data"
JIT_LIST = "TorchScript's list / type tag: returns its argument (torch/jit/_pickle.py)"
STR_ENUM = (
    "a str Enum: calling it looks a member up by value; its _missing_ only raises (checked in {lib}'s "
    "source); the Hugging Face Trainer pickles these in training_args.bin"
)


# quantization schemes and sparse layouts: constants torch's quantized / sparse rebuilds take
QSCHEMES = (
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
)
SPARSE_LAYOUTS = ("torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc", "torch.sparse_bsr", "torch.sparse_bsc")
OTHER_REBUILD = (
    "one of torch's weights-only tensor rebuilds ({what}): builds a tensor from tensors and numbers; "
    "rebuilt here as an inert description, written back as the same call"
)


def _entries() -> dict[tuple[str, str], str]:
    table: dict[tuple[str, str], str] = {
        ("torch._utils", "_rebuild_tensor"): TENSOR_REBUILD,
        ("torch._utils", "_rebuild_tensor_v2"): TENSOR_REBUILD,
        ("torch._utils", "_rebuild_tensor_v3"): TENSOR_REBUILD,
        ("torch._utils", "_rebuild_qtensor"): OTHER_REBUILD.format(what="a quantized tensor"),
        ("torch._utils", "_rebuild_sparse_tensor"): OTHER_REBUILD.format(what="a sparse COO / compressed tensor"),
        ("torch._utils", "_rebuild_nested_tensor"): OTHER_REBUILD.format(what="a nested tensor"),
        ("torch._utils", "_rebuild_meta_tensor_no_storage"): OTHER_REBUILD.format(what="a meta tensor, no data"),
        ("torch._utils", "_rebuild_parameter"): "wraps a rebuilt tensor as an nn.Parameter (a flag here)",
        ("torch._utils", "_rebuild_parameter_with_state"): "a Parameter with plain attribute state",
        ("torch._tensor", "_rebuild_from_type_v2"): "tensor subclass rebuild; its function argument is judged "
        "as a call of its own",
        ("torch", "Size"): "a shape: a tuple of ints",
        ("torch", "device"): "a device name such as 'cuda:0'",
        ("torch", "strided"): "the strided layout constant",
        ("torch", "contiguous_format"): "a memory-format constant",
        ("torch", "channels_last"): "a memory-format constant",
        ("torch", "preserve_format"): "a memory-format constant",
        ("torch.torch_version", "TorchVersion"): "a version string",
        ("torch.serialization", "_get_layout"): "maps a layout name to torch's layout constant (DCP metadata)",
        ("torch", "Tensor"): "the tensor class, as the target type of a tensor rebuild",
        ("torch._tensor", "Tensor"): "the tensor class, as the target type of a tensor rebuild",
        ("torch.nn.parameter", "Parameter"): "the Parameter class, as the target type of a tensor rebuild",
        ("collections", "OrderedDict"): BUILTIN_TYPE,
        # TorchScript archives (torch.jit.save) tag their lists with these: each returns its (first) argument
        ("torch.jit._pickle", "build_intlist"): JIT_LIST,
        ("torch.jit._pickle", "build_tensorlist"): JIT_LIST,
        ("torch.jit._pickle", "build_doublelist"): JIT_LIST,
        ("torch.jit._pickle", "build_boollist"): JIT_LIST,
        ("torch.jit._pickle", "build_tensor_from_id"): JIT_LIST,
        ("torch.jit._pickle", "restore_type_tag"): JIT_LIST,
        # Ultralytics' resumable last.pt pickles the model's hyperparameters as this class (8.x): a
        # types.SimpleNamespace subclass that adds only read methods (__iter__, __getattr__, get), no __init__;
        # calling it sets attributes from the file's keywords.  Without it every genuine resumable
        # Ultralytics checkpoint would be an error.
        **{
            ("transformers.trainer_utils", n): STR_ENUM.format(lib="transformers 5")
            for n in ("SchedulerType", "IntervalStrategy", "SaveStrategy", "HubStrategy", "FSDPOption")
        },
        ("transformers.training_args", "OptimizerNames"): STR_ENUM.format(lib="transformers 5"),
        ("transformers.debug_utils", "DebugOption"): STR_ENUM.format(lib="transformers 5"),
        **{
            ("accelerate.utils.dataclasses", n): STR_ENUM.format(lib="accelerate 1.15")
            for n in ("DistributedType", "PrecisionType", "DynamoBackend")
        },
        ("ultralytics.utils", "IterableSimpleNamespace"): "Ultralytics' SimpleNamespace subclass (no __init__ "
        "of its own): calling it only sets attributes",
        ("types", "SimpleNamespace"): "an attribute bag: takes no positional arguments, state is plain data",
        ("builtins", "object"): "the base class argument of copyreg._reconstructor (never called)",
        ("builtins", "set"): BUILTIN_TYPE,
        ("builtins", "frozenset"): BUILTIN_TYPE,
        ("builtins", "complex"): BUILTIN_TYPE,
        ("builtins", "slice"): BUILTIN_TYPE,
        ("builtins", "bytearray"): BUILTIN_TYPE,
        ("builtins", "range"): BUILTIN_TYPE,
        ("copyreg", "_reconstructor"): "protocol 0/1 object construction; allowed only with base `object`",
        ("copyreg", "__newobj__"): "cls.__new__(cls, *args): judged as a construction of cls",
        ("_codecs", "encode"): "how protocol 2 stores bytes (text -> latin-1); other encodings are refused",
        ("numpy.core.multiarray", "_reconstruct"): NUMPY,
        ("numpy._core.multiarray", "_reconstruct"): NUMPY,
        ("numpy.core.multiarray", "scalar"): NUMPY,
        ("numpy._core.multiarray", "scalar"): NUMPY,
        ("numpy", "ndarray"): NUMPY,
        ("numpy", "dtype"): NUMPY,
        ("numpy.core.numeric", "_frombuffer"): NUMPY + " (protocol 5: an array from a bytes buffer)",
        ("numpy._core.numeric", "_frombuffer"): NUMPY + " (protocol 5: an array from a bytes buffer)",
    }
    for t in ("dict", "list", "tuple", "int", "float", "str", "bool", "bytes"):
        table[("builtins", t)] = BUILTIN_TYPE
    # value types people keep in checkpoint metadata (dates of a run, label counts, ids); each builds a value
    # from the data it is given and runs nothing the file names.  Read here as inert placeholders.
    for name in ("datetime", "date", "time", "timedelta", "timezone"):
        table[("datetime", name)] = STDLIB_VALUE.format(what="a date / time value (C-implemented, from bytes)")
    table[("collections", "Counter")] = STDLIB_VALUE.format(what="a dict of counts")
    table[("fractions", "Fraction")] = STDLIB_VALUE.format(what="a rational number (from a string or two ints)")
    table[("decimal", "Decimal")] = STDLIB_VALUE.format(what="a decimal number (from a string)")
    # only this class of uuid: the module itself stays dangerous (its node helpers start processes)
    table[("uuid", "UUID")] = STDLIB_VALUE.format(what="a 128-bit id (state: one int)")
    for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        table[("pathlib", name)] = "a filesystem path value (no file is touched)"
    for name in QSCHEMES:
        table[("torch", name)] = "a quantization scheme constant"
    for name in SPARSE_LAYOUTS:
        table[("torch", name.removeprefix("torch."))] = "a sparse layout constant"
    for name in list(DTYPES) + list(TORCH_ALIASES):
        table[("torch", name)] = DTYPE
    for info in DTYPES.values():
        if info.storage_class:
            table[("torch", info.storage_class)] = DTYPE
    table[("torch", "UntypedStorage")] = table[("torch.storage", "UntypedStorage")] = DTYPE
    table[("torch", "TypedStorage")] = table[("torch.storage", "TypedStorage")] = DTYPE
    for name in (
        "float64",
        "float32",
        "float16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool_",
        "complex64",
        "complex128",
    ):
        table[("numpy", name)] = NUMPY
    for name in (
        "Float64DType",
        "Float32DType",
        "Float16DType",
        "Int64DType",
        "Int32DType",
        "Int16DType",
        "Int8DType",
        "UInt8DType",
        "UInt16DType",
        "UInt32DType",
        "UInt64DType",
        "BoolDType",
    ):
        table[("numpy.dtypes", name)] = NUMPY
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
    ):
        table[("torch.distributed.checkpoint.metadata", name)] = DCP_METADATA
    table[("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING")] = (
        "an Enum of DCP's metadata: calling an Enum class with a value looks up its member"
    )
    table[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = DCP_METADATA
    table[("torch.distributed.checkpoint.planner", "WriteItemType")] = DCP_METADATA
    return table


ALLOWED: dict[tuple[str, str], str] = _entries()

# modules whose mere use in a checkpoint is an attack, whatever the pickle does with the name
DANGEROUS_MODULES = frozenset(
    {
        "os",
        "posix",
        "nt",
        "posixpath",
        "ntpath",
        "subprocess",
        "_posixsubprocess",
        "sys",
        "importlib",
        "runpy",
        "pickle",
        "_pickle",
        "pickletools",
        "shelve",
        "marshal",
        "dill",
        "cloudpickle",
        "joblib",
        "socket",
        "ssl",
        "shutil",
        "pty",
        "ctypes",
        "_ctypes",
        "cffi",
        "code",
        "codeop",
        "webbrowser",
        "antigravity",
        "multiprocessing",
        "concurrent",
        "signal",
        "asyncio",
        "_thread",
        "threading",
        "tempfile",
        "io",
        "_io",
        "urllib",
        "http",
        "ftplib",
        "smtplib",
        "telnetlib",
        "requests",
        "httpx",
        "functools",
        "operator",
        "inspect",
        "pip",
        "ensurepip",
        "setuptools",
        "distutils",
        "timeit",
        "pdb",
        "bdb",
        "trace",
        "profile",
        "cProfile",
        "zipimport",
        "pkgutil",
        "imp",
        "site",
        "sysconfig",
        "pydoc",
        "idlelib",
        "lib2to3",
        "builtins",
        "gc",
        "weakref",
        "atexit",
        "resource",
        "fcntl",
        "mmap",
        "linecache",
        "glob",
        "zipfile",
        "tarfile",
        "logging",
        "codecs",
        "_codecs",
        "bz2",
        "gzip",
        "lzma",
        "sqlite3",
        "dbm",
        "xmlrpc",
        "nturl2path",
        "uuid",
        "platform",
        "venv",
        "unittest",
        "doctest",
        "test",
        "this",
        # inside torch and numpy: the parts that load, compile, run or fetch code
        "torch.hub",
        "torch._C",
        "torch.ops",
        "torch.jit",
        "torch.package",
        "torch.serialization",
        "torch.storage",
        "torch.utils",
        "torch._inductor",
        "torch._dynamo",
        "torch.fx",
        "torch.compiler",
        "torch._ops",
        "torch.library",
        "torch.distributed",
        "torch.multiprocessing",
        "torch.cuda",
        "torch.backends",
        "torch.load",
        "numpy.testing",
        "numpy.f2py",
        "numpy.distutils",
        "numpy.ctypeslib",
        "numpy.lib",
        "numpy.load",
        "numpy.save",
        "numpy.savetxt",
        "numpy.loadtxt",
        "numpy.fromfile",
        "numpy.memmap",
    }
)


@dataclass(frozen=True)
class Judgement:
    reference: str  # "module.name", or "<pickle>" for what cannot be tied to one name
    status: str  # allowed | code | dangerous
    uses: tuple[str, ...]  # called / constructed / referenced
    reason: str  # allowed: why it is safe; code: what it needs; dangerous: what loading would do


def is_dangerous_name(ref: Reference) -> bool:
    """A reference to a dangerous module, or a dotted name that walks through one or through a dunder."""
    parts = ref.module.split(".") + ref.name.split(".")
    if any(p.startswith("__") and p.endswith("__") and p not in ("__newobj__",) for p in ref.name.split(".")):
        return True
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in DANGEROUS_MODULES:
            return True
    attr_parts = ref.name.split(".")[:-1]  # `torch` + `serialization.pickle.loads` passes through `pickle`
    return any(p in DANGEROUS_MODULES for p in attr_parts)


def judge(scan: PickleScan) -> list[Judgement]:
    """One judgement per reference of the scan, plus one per thing the scan could not follow."""
    uses = {ref: set(how) for ref, how in scan.uses.items()}
    extra: list[Judgement] = []
    for call in scan.calls:
        rule = ARGUMENT_RULES.get((call.ref.module, call.ref.name))
        if rule is not None:
            extra.extend(rule(call, uses))
    out = []
    for ref, how in uses.items():
        out.append(_judge_reference(ref, how))
    out.extend(extra)
    out.extend(Judgement("<pickle>", DANGEROUS, (), problem) for problem in scan.problems)
    if scan.error:
        out.append(
            Judgement(
                "<pickle>",
                DANGEROUS,
                (),
                f"the opcode stream could not be followed to its end ({scan.error}): the pickle cannot be shown safe",
            )
        )
    return out


def _judge_reference(ref: Reference, how: set[str]) -> Judgement:
    uses = tuple(sorted(how))
    reason = ALLOWED.get((ref.module, ref.name))
    if reason is not None:
        return Judgement(ref.qualname, ALLOWED_STATUS, uses, reason)
    if CALLED in how:
        return Judgement(
            ref.qualname,
            DANGEROUS,
            uses,
            f"torch.load(weights_only=False) would call {ref.qualname}(...) with arguments from the file",
        )
    if is_dangerous_name(ref):
        verb = "build" if CONSTRUCTED in how else "import"
        return Judgement(
            ref.qualname,
            DANGEROUS,
            uses,
            f"torch.load(weights_only=False) would {verb} "
            f"{ref.qualname}, from a module a checkpoint has no reason to name",
        )
    library = ref.module.split(".")[0]
    what = "builds an object of" if CONSTRUCTED in how else "names"
    return Judgement(
        ref.qualname,
        CODE,
        uses,
        f"{what} {ref.qualname}: needs the {library!r} library to load "
        "with torch.load(weights_only=False); read here as an inert placeholder",
    )


# ---- argument rules: allowed callables whose safety depends on what they are given ---------------------------


def _global(arg) -> Reference | None:
    return arg.ref if isinstance(arg, Global) else None


def _reconstructor(call: Call, uses: dict) -> list[Judgement]:
    out = []
    cls = _global(call.args[0]) if call.args else None
    if cls is not None:
        uses.setdefault(cls, set()).add(CONSTRUCTED)
    base = _global(call.args[1]) if len(call.args) > 1 else None
    if base != Reference("builtins", "object"):
        name = base.qualname if base else "a value computed at load time"
        out.append(
            Judgement(
                name,
                DANGEROUS,
                (CALLED,),
                f"copyreg._reconstructor with base {name} would run {name}.__init__ on the file's state",
            )
        )
    return out


def _newobj(call: Call, uses: dict) -> list[Judgement]:
    cls = _global(call.args[0]) if call.args else None
    if cls is not None:
        uses.setdefault(cls, set()).add(CONSTRUCTED)
        return []
    return [
        Judgement("copyreg.__newobj__", DANGEROUS, (CALLED,), "copyreg.__newobj__ of a class computed at load time")
    ]


def _rebuild_from_type(call: Call, uses: dict) -> list[Judgement]:
    func = _global(call.args[0]) if call.args else None
    if func is None:
        return [
            Judgement(
                "torch._tensor._rebuild_from_type_v2",
                DANGEROUS,
                (CALLED,),
                "_rebuild_from_type_v2 would call a function computed at load time",
            )
        ]
    uses.setdefault(func, set()).add(CALLED)
    new_type = _global(call.args[1]) if len(call.args) > 1 else None
    if new_type is not None and new_type != Reference("torch", "Tensor"):
        uses.setdefault(new_type, set()).add(CONSTRUCTED)
    return []


TEXT_ENCODINGS = frozenset({"latin1", "latin-1", "utf-8", "utf8", "ascii"})


def _codecs_encode(call: Call, uses: dict) -> list[Judgement]:
    encoding = call.args[1] if len(call.args) > 1 else "utf-8"
    if isinstance(encoding, str) and encoding.lower() in TEXT_ENCODINGS and len(call.args) <= 3:
        return []
    return [
        Judgement(
            "_codecs.encode",
            DANGEROUS,
            (CALLED,),
            "_codecs.encode with an encoding that is not plain text (codecs can run code)",
        )
    ]


ARGUMENT_RULES: dict[tuple[str, str], Callable[[Call, dict], list[Judgement]]] = {
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("_codecs", "encode"): _codecs_encode,
}


def markdown_table() -> str:
    """The allow-list as a markdown table (docs/security.md embeds it; a test checks it is current)."""
    rows = ["| module | name | why it is safe |", "|---|---|---|"]
    rows += [f"| `{m}` | `{n}` | {reason} |" for (m, n), reason in sorted(ALLOWED.items())]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
