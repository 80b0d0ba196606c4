"""``torch.export`` program archives (``.pt2``), read as archives: the weights and constants are listed as
tensors (their raw bytes are zip records, described by ``data/weights/model_weights_config.json``); the
program itself (``models/model.json``) is named, not judged.  Nothing in the archive is unpickled except the
records its config marks ``use_pickle``, which go through the same scan and inert reader as any pickle."""

from __future__ import annotations

import json
from pathlib import Path

from ckpttools.formats import zipformat
from ckpttools.formats.base import Checkpoint
from ckpttools.report import ERROR, INFO, Finding
from ckpttools.tensors import DType, LazyTensor, StorageRef

NAME = "pt2"
# torch._export.serde.schema.ScalarType codes -> torch dtype names
SCALAR_TYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    9: "complex32",
    10: "complex64",
    11: "complex128",
    12: "bool",
    13: "bfloat16",
}


def is_pt2(names: list[str]) -> str | None:
    """The archive's top folder when ``names`` are a torch.export archive's records."""
    for n in names:
        if n.endswith("/models/model.json") or n == "models/model.json":
            return n[: -len("models/model.json")]
    return None


def read_records(ckpt: Checkpoint, path: Path, records: dict, top: str) -> Checkpoint:
    ckpt.format = NAME
    ckpt.records = records
    tree: dict = {}
    for group in ("weights", "constants"):
        config_name = f"{top}data/{group}/model_{group}_config.json"
        record = records.get(config_name)
        if record is None:
            continue
        try:
            config = json.loads(zipformat.read_record(path, record)).get("config", {})
        except (ValueError, OSError) as exc:
            ckpt.findings.append(Finding(ERROR, "pt2.bad-config", f"{config_name}: unreadable ({exc})", config_name))
            continue
        tensors = {}
        for name, entry in config.items():
            meta = entry.get("tensor_meta") or {}
            if entry.get("use_pickle") or not meta:
                continue  # a pickled constant (scanned with the other pickles); not a plain tensor
            dtype = SCALAR_TYPES.get(meta.get("dtype"))
            shape = tuple(int(s.get("as_int", 0)) for s in meta.get("sizes", []))
            strides = tuple(int(s.get("as_int", 0)) for s in meta.get("strides", []))
            data_name = f"{top}data/{group}/{entry.get('path_name')}"
            data = records.get(data_name)
            if dtype is None or data is None:
                ckpt.findings.append(
                    Finding(
                        ERROR,
                        "pt2.bad-config",
                        f"{name}: dtype code {meta.get('dtype')} or record {data_name} unknown",
                        data_name,
                    )
                )
                continue
            itemsize = DType(dtype).itemsize
            numel = max(1, data.size // itemsize) if data.size else 0
            ref = StorageRef(data_name, DType(dtype), numel, "cpu")
            ckpt.storages[data_name] = ref
            tensors[name] = LazyTensor(ref, int((meta.get("storage_offset") or {}).get("as_int", 0)), shape, strides)
        tree[group] = tensors
    ckpt.tree = tree
    ckpt.record_of = lambda ref: records.get(ref.key)
    ckpt.record_name_of = lambda ref: ref.key
    ckpt.iter_storage = lambda ref, chunk: (
        zipformat.iter_record_bytes(path, records[ref.key], chunk)
        if ref.key in records and not records[ref.key].truncated
        else iter(())
    )
    ckpt.findings.append(
        Finding(
            INFO,
            "pt2.program",
            "a torch.export program archive: its weights are listed; the "
            f"program ({top}models/model.json) is named, not judged",
            f"{top}models/model.json",
        )
    )
    return ckpt
