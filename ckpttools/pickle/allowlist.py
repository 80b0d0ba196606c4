"""THE allow-list, as data: (module, name) -> why naming it in a checkpoint's pickle is safe, exact names only,
and the modules whose mere use is an attack.  ``policy.py`` judges with them (and ``unpickler.py`` rebuilds only
what they allow); no other module decides what is safe."""

from __future__ import annotations

from ckpttools.tensors import DTYPES, TORCH_ALIASES

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


def _named_one_by_one() -> dict[tuple[str, str], str]:
    """The entries written out one by one."""
    return {
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
        # Ultralytics' resumable last.pt pickles the model's hyperparameters as this class (8.x): a
        # types.SimpleNamespace subclass that adds only read methods (__iter__, __getattr__, get), no __init__;
        # calling it sets attributes from the file's keywords.  Without it every genuine resumable
        # Ultralytics checkpoint would be an error.
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


def _families(table: dict[tuple[str, str], str]) -> None:
    """Builtin and standard-library value types, torch's constants, dtypes and storage types."""
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


def _numpy_and_dcp(table: dict[tuple[str, str], str]) -> None:
    """numpy's scalar and dtype classes, DCP's metadata classes."""
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


def _table() -> dict[tuple[str, str], str]:
    table = _named_one_by_one()
    _families(table)
    _numpy_and_dcp(table)
    return table


ALLOWED: dict[tuple[str, str], str] = _table()


# modules whose mere use in a checkpoint is an attack, whatever the pickle does with the name
_DANGEROUS_WORDS = (  # a module per word: easier to read than 130 quoted names
    "os posix nt posixpath ntpath subprocess _posixsubprocess sys importlib runpy pickle _pickle "
    "pickletools shelve marshal dill cloudpickle joblib socket ssl shutil pty ctypes _ctypes cffi code "
    "codeop webbrowser antigravity multiprocessing concurrent signal asyncio _thread threading tempfile "
    "io _io urllib http ftplib smtplib telnetlib requests httpx functools operator inspect pip ensurepip "
    "setuptools distutils timeit pdb bdb trace profile cProfile zipimport pkgutil imp site sysconfig "
    "pydoc idlelib lib2to3 builtins gc weakref atexit resource fcntl mmap linecache glob zipfile tarfile "
    "logging codecs _codecs bz2 gzip lzma sqlite3 dbm xmlrpc nturl2path uuid platform venv unittest "
    "doctest test this "
    # inside torch and numpy: the parts that load, compile, run or fetch code
    "torch.hub torch._C torch.ops torch.jit torch.package torch.serialization torch.storage torch.utils "
    "torch._inductor torch._dynamo torch.fx torch.compiler torch._ops torch.library torch.distributed "
    "torch.multiprocessing torch.cuda torch.backends torch.load numpy.testing numpy.f2py numpy.distutils "
    "numpy.ctypeslib numpy.lib numpy.load numpy.save numpy.savetxt numpy.loadtxt numpy.fromfile "
    "numpy.memmap "
)
DANGEROUS_MODULES = frozenset(_DANGEROUS_WORDS.split())
