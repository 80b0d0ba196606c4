"""What every container format gives back: a ``Checkpoint`` (tree of plain values and lazy tensors, the scan of
every pickle it holds, container findings, and a way to stream each storage's bytes).

A format module (``formats/<name>.py``) provides ``detect(path, head) -> bool`` and ``read(path) ->
Checkpoint``; one that can be written also ``write_converted(tree, request: WriteRequest)``, the one entry
`ckpt convert` calls (``commands/convert.WRITERS`` maps each target to its module), and where it cannot hold
every tensor, ``writable(tensor) -> bool``.  ``formats/registry.py`` holds the list and ``open_checkpoint``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpttools.errors import FormatLimit, MissingPath, NotACheckpoint
from ckpttools.objects import Placeholder, Reference
from ckpttools.pickle.background import PendingScan, settled, start_scan
from ckpttools.pickle.policy import DANGEROUS, Judgement, judge
from ckpttools.pickle.scan_model import PickleScan
from ckpttools.pickle.unpickler import UnknownDType, restricted_load
from ckpttools.report import ERROR, Finding, counted
from ckpttools.tensors import TENSOR_TYPES, DType, LazyTensor, RebuiltTensor, StorageRef, TensorSource, module_tensors
from ckpttools.trees import iter_nodes

CHUNK = 8 << 20  # bytes per block when streaming a storage


@dataclass
class Checkpoint:
    """A checkpoint opened for inspection.  ``tree`` holds plain values and LazyTensors."""

    path: Path
    format: str
    tree: Any = None
    # (where, scan) of every pickle read; a large one's scan may still be running beside (pickle.background)
    scans: list[tuple[str, PickleScan | PendingScan]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # container problems seen while opening
    records: dict[str, Any] = field(default_factory=dict)  # zip records by name (torch zip, DCP items)
    storages: dict[str, StorageRef] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    iter_storage: Callable[[StorageRef, int], Iterator[bytes]] | None = None
    record_of: Callable[[StorageRef], Any] | None = None  # the zip record behind a storage, where there is one
    record_name_of: Callable[[StorageRef], str] | None = None  # the name that record has (or should have)

    def storage_chunks(self, ref: StorageRef, chunk: int = CHUNK) -> Iterator[bytes]:
        if self.iter_storage is None:
            return iter(())
        return self.iter_storage(ref, chunk)

    @property
    def references(self) -> list[Reference]:
        return list(dict.fromkeys(ref for _, scan in self.settled_scans() for ref in scan.references))

    def safety(self) -> list[tuple[str, Judgement]]:
        """(where, judgement) for every reference of every pickle, by the one policy."""
        return [(where, j) for where, scan in self.settled_scans() for j in judge(scan)]

    def settled_scans(self) -> list[tuple[str, PickleScan]]:
        """Every scan, finished (waiting for the ones running beside)."""
        self.scans = [(where, settled(scan)) for where, scan in self.scans]
        return self.scans

    def dangerous(self) -> list[tuple[str, Judgement]]:
        return [(where, j) for where, j in self.safety() if j.status == DANGEROUS]

    def read_pickle(
        self, data: bytes, where: str, persistent_load=None, scan: PickleScan | PendingScan | None = None
    ) -> Any:
        """Scan ``data`` (the static scan is recorded whatever happens; ``scan``: one already started on these
        very bytes), then unpickle it inertly.  A pickle that cannot be read is a finding; returns None then."""
        self.scans.append((where, scan if scan is not None else start_scan(data)))
        try:
            return restricted_load(data, persistent_load)
        except UnknownDType as exc:
            self.findings.append(
                Finding(ERROR, "tensor.unknown-dtype", f"{exc} (a newer ckpttools may read it)", where)
            )
            return None
        except Exception as exc:  # noqa: BLE001 - any failure of a damaged or hostile pickle is a finding
            self.findings.append(
                Finding(
                    ERROR, "pickle.unreadable", f"the pickle cannot be read: {exc.__class__.__name__}: {exc}", where
                )
            )
            return None


def regular_file_or_folder(path: Path) -> os.stat_result:
    """stat of ``path``; refuses what is neither a regular file nor a folder (a FIFO would block every read)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MissingPath(path) from None
    except OSError as exc:  # a symlink loop, a permission problem
        raise NotACheckpoint(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise NotACheckpoint(f"{path}: not a regular file or folder (a device, FIFO or socket)")
    return st


def describe_non_checkpoint(path: Path) -> str:
    """What a path that is not a readable checkpoint looks like, in a few words."""
    if path.is_dir():
        return "a folder without .metadata (not a torch.distributed.checkpoint folder)"
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(16)
    kinds = {
        b"\x89PNG": "a PNG image",
        b"\xff\xd8\xff": "a JPEG image",
        b"GIF8": "a GIF image",
        b"%PDF": "a PDF",
        b"\x1f\x8b": "a gzip file",
        b"BM": "a BMP image",
    }
    for magic, what in kinds.items():
        if head.startswith(magic):
            return what
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return f"not a known checkpoint container ({size} bytes, starts with {head[:8].hex()})"


def storage_from_pid(ckpt: Checkpoint, pid: Any, reader=None) -> StorageRef:
    """The storage a torch persistent id ``('storage', type, key, location, numel)`` names (one per key)."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise ValueError(f"unknown persistent id {pid!r}")
    _, storage_type, key, location, numel = pid[:5]
    key = str(key)
    if key not in ckpt.storages:
        dtype = storage_type if isinstance(storage_type, DType) else DType("uint8")
        ckpt.storages[key] = StorageRef(key, dtype, int(numel), str(location), reader)
    return ckpt.storages[key]


def to_plain_tree(tree: Any, notes: list[str], where: str = "", _done: dict | None = None) -> Any:
    """The tree with what only a pickle can hold (objects of classes never imported, torch dtypes) turned into
    plain data a non-pickle format (HDF5, DCP) can store; every change is noted.  A container met again is
    converted once and the result shared (work and notes grow with the objects, not the paths)."""
    done = {} if _done is None else _done
    if id(tree) in done:
        return done[id(tree)][1]
    if isinstance(tree, dict):
        out: Any = {}
        done[id(tree)] = (tree, out)  # the original is kept alive so its id is not reused meanwhile
        for k, v in tree.items():
            out[k] = to_plain_tree(v, notes, f"{where}/{k}" if where else str(k), done)
        return out
    if isinstance(tree, list):
        out = []
        done[id(tree)] = (tree, out)
        out.extend(to_plain_tree(v, notes, f"{where}[{i}]", done) for i, v in enumerate(tree))
        return out
    if isinstance(tree, tuple):
        out = tuple(to_plain_tree(v, notes, f"{where}[{i}]", done) for i, v in enumerate(tree))
    elif isinstance(tree, DType):
        return f"torch.{tree}"
    elif isinstance(tree, Placeholder):
        name = tree._reference.qualname
        weights = module_tensors(tree)
        if weights:
            notes.append(
                f"{where or 'root'}: pickled {name} stored as its state dict ({counted(len(weights), 'tensor')}); "
                "the class itself is not carried"
            )
            out = weights
        else:
            state = tree.state
            notes.append(f"{where or 'root'}: pickled {name} stored as its recorded attributes")
            out = to_plain_tree(state if isinstance(state, (dict, list, tuple)) else {}, notes, where, done)
    elif isinstance(tree, type) and issubclass(tree, Placeholder):
        notes.append(f"{where}: reference to {tree._reference.qualname} stored as its name")
        return tree._reference.qualname
    else:
        return tree
    done[id(tree)] = (tree, out)
    return out


@dataclass
class WriteRequest:
    """What a format's ``write_converted`` is given besides the tree: where, the tensors' bytes, the options of
    the targets that have them; ``notes`` collects what the writer changed or could not carry."""

    out: Path
    source: TensorSource  # each tensor's bytes, read (or computed) one at a time
    input_name: str  # named in a refusal
    replace: bool = False  # an existing ``out`` may be replaced (checked by the caller)
    on_bytes: Callable[[int], None] | None = None  # progress
    compress: bool = False  # HDF5: gzip the datasets
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors: the header's __metadata__
    world_size: int = 1  # DCP: ranks that write the folder
    check_folder: Callable[[Path], bool] | None = None  # DCP: run on the finished folder before it is swapped in
    notes: list[str] = field(default_factory=list)


def refuse_unwritable(
    tree: Any, request: WriteRequest, target: str, writable: Callable[[LazyTensor], bool] = lambda t: True
) -> None:
    """FormatLimit (exit 2) naming every tensor ``target`` cannot hold exactly (a dtype it has no code for; a
    quantized, sparse, nested or meta tensor, which only the torch format holds): nothing is changed or left
    out silently."""
    lacking: list[tuple[str, str]] = []  # (path, what)
    for path, t in iter_nodes(tree, TENSOR_TYPES, inside_found=False):
        if isinstance(t, RebuiltTensor):
            lacking.append((path, f"{t.kind} tensor"))
        elif not writable(t):
            lacking.append((path, f"dtype {t.dtype}"))
    if lacking:
        kinds = ", ".join(sorted({what for _, what in lacking}))
        names = ", ".join(path for path, _ in lacking[:8]) + (" ..." if len(lacking) > 8 else "")
        raise FormatLimit(
            f"{request.input_name}: {target} cannot hold {counted(len(lacking), 'tensor')} exactly ({kinds}): "
            f"{names}; nothing written (.pt keeps every tensor)",
            [path for path, _ in lacking],
        )
