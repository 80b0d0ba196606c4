"""The run record the preflight compares for fuse-train checkpoints: ``fuse_train_schema.run_record``;
``--data`` is fingerprinted by the dataset reader; a structure option (fusion, scale, image size) given on its
own leaves the model fingerprint to fuse-train, which compares it when it builds the model.  Apart from the
rules (``fuse_train.py``) because it reads datasets: see ``run_records.py``."""

from __future__ import annotations

from typing import Any

from ckpttools.datasets.spec import DatasetError, load_data_spec
from ckpttools.datasets.survey import spec_fingerprint
from ckpttools.errors import UsageError
from ckpttools.trainers import fuse_train_schema as S
from ckpttools.trainers.base import RunRecords


class FuseTrainRecords(RunRecords):
    def run_record(self, tree: dict) -> dict[str, Any] | None:
        return S.record_of_checkpoint(tree)

    def requested_record(self, recorded: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        requested = dict(recorded)
        for name, value in given.items():
            if name == "data":
                try:  # computed in the fingerprint version the checkpoint recorded (datasets/survey.py)
                    spec = load_data_spec(value)
                    fingerprint = spec_fingerprint(spec, like=recorded.get("data-fingerprint"))
                except DatasetError as exc:
                    raise UsageError(f"--data: {exc}") from None
                requested["data"], requested["data-fingerprint"] = str(spec.yaml_path), fingerprint
            else:
                requested[name] = value
        if {"fusion", "scale", "img-size"} & set(given):
            requested.pop("model", None)  # the structure fingerprint is compared by fuse-train itself
        return requested


RECORDS = FuseTrainRecords()
