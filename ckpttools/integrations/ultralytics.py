"""Safe saves and exact resumes for people who keep training with Ultralytics (or YOLOFuse, its RGB+IR fork).

    from ultralytics import YOLO
    from ckpttools.integrations.ultralytics import SafeDetectionTrainer

    YOLO("yolo11n.yaml").train(data="data.yaml", epochs=100, trainer=SafeDetectionTrainer)
    YOLO("runs/detect/train/weights/last.pt").train(resume=True, trainer=SafeDetectionTrainer)

What it changes, and nothing else (the training itself is Ultralytics'):

* **Atomic saves.** Ultralytics writes ``last.pt`` in place (a kill mid-write leaves a torn file).  Here it
  writes into a private staging folder, and each checkpoint is published with temp file + fsync + rename; the
  previous good ``last.pt`` is kept as ``last.prev.pt``.  The final strip of the optimizer is done the same way,
  after the full resumable checkpoint is kept as ``last.resumable.pt`` (for ``extend_epochs``).
* **A content digest** in every checkpoint (``digest``), so ``ckpt verify`` checks content, not only CRC32s.
* **Exact resume state** under ``ckpttools_state``: the fp32 training weights (Ultralytics resumes from its
  fp16 EMA), the fp32 EMA, the full optimizer state (Ultralytics stores fp16 moments), and the RNG states
  (python, numpy, torch, CUDA, the training loader's generator).  Restored after Ultralytics' own resume.
* **The preflight on resume.**  ``resume=True`` compares the checkpoint's ``train_args`` and dataset (from the
  label cache Ultralytics wrote) with what this resume would use; a difference blocks with a message that says
  what Ultralytics would have done with it.  Allow fields with ``safe_trainer(allow_change="batch,lr0")`` or the
  environment variable ``CKPTTOOLS_ALLOW_CHANGE``; allowed changes are recorded under ``ckpttools.history``.
* ``extend_epochs(path, epochs)``: a finished run's ``last.resumable.pt`` with a new epoch count, which
  ``resume=True`` continues (the learning-rate schedule is stretched to the new end: an extension, not an
  exact continuation).

Ultralytics ignores unknown top-level checkpoint keys, so the files stay loadable by plain Ultralytics.
Single process (and rank 0 of DDP) RNG only: Ultralytics saves on rank 0 alone.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
from pathlib import Path

import torch

from ckpttools import layouts as L
from ckpttools.atomic import atomic_write, copy_into_place, keep_previous, temp_path
from ckpttools.commands.preflight import parse_allow, preflight, requested_fields
from ckpttools.digest import DIGEST_ALGORITHM, DIGEST_KEY, lazy_digest, refresh_digest
from ckpttools.formats import torchzip
from ckpttools.formats.registry import open_checkpoint
from ckpttools.integrations.ultralytics_state import capture_state, restore_image_buffer, restore_state
from ckpttools.report import counted
from ckpttools.tensors import TensorSource
from ckpttools.trainers import ultralytics as U
from ckpttools.trainers import ultralytics_records as UR
from ckpttools.trainers.base import now
from ckpttools.trainers.registry import rules_for

STATE_KEY, RECORD_KEY = "ckpttools_state", "ckpttools"
ALLOW_ENV = "CKPTTOOLS_ALLOW_CHANGE"
RESUMABLE_NAME = "last.resumable.pt"


class UltralyticsUnavailable(ImportError):
    """Ultralytics cannot be imported here; the message says why and what to install (one line)."""


def _detection_trainer() -> type:
    try:
        from ultralytics.models.yolo.detect import DetectionTrainer
    except Exception as exc:  # noqa: BLE001 - any failure inside Ultralytics' imports is answered the same way
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        hint = (
            "torchvision was built for another torch: install the torchvision release made for torch "
            f"{torch.__version__} from the index that torch came from (a CPU torch: pip install torchvision "
            "--index-url https://download.pytorch.org/whl/cpu)"
            if "torchvision" in first or "operator" in first
            else "pip install 'ultralytics>=8.3'"
        )
        raise UltralyticsUnavailable(f"ckpttools: Ultralytics cannot be imported ({first}): {hint}") from None
    return DetectionTrainer


class ResumeBlocked(RuntimeError):
    """The preflight found a difference that was not allowed; the message lists them."""


def __getattr__(name: str):
    if name == "SafeDetectionTrainer":  # built on first use: importing this module does not import ultralytics
        return safe_trainer()
    raise AttributeError(name)


@functools.cache
def safe_trainer(base: type | None = None, allow_change: str = "") -> type:
    """A subclass of ``base`` (default: Ultralytics' DetectionTrainer; any BaseTrainer subclass works, e.g.
    YOLOFuse's) with safe saves and exact, preflighted resumes.  ``allow_change``: preflight fields that may
    differ on resume (comma-separated, as ``ckpt preflight --allow-change``)."""
    if base is None:
        base = _detection_trainer()
    allowed = frozenset(parse_allow(allow_change))
    return type(f"Safe{base.__name__}", (_SafeMixin, base), {"allow_change": allowed, "__module__": __name__})


class _SafeMixin:
    allow_change: frozenset = frozenset()

    # ---- resume ------------------------------------------------------------------------------------------
    def check_resume(self, overrides):
        super().check_resume(overrides)
        self._ckpttools_history, self._ckpttools_data = [], None
        if self.resume:
            self._ckpttools_history, self._ckpttools_data = _preflight_resume(
                Path(self.args.resume), overrides, self._allowed()
            )

    def _allowed(self) -> set[str]:
        return set(self.allow_change) | parse_allow(os.environ.get(ALLOW_ENV, ""))

    def resume_training(self, ckpt):
        state = (ckpt or {}).get(STATE_KEY) if self.resume else None
        # Ultralytics 8.3 closes mosaic on resume whenever start_epoch > epochs - close_mosaic, also in a run
        # shorter than close_mosaic, where the uninterrupted run (closing at epoch == epochs - close_mosaic)
        # never does: the mosaic state the save recorded is kept, and the training loop closes it when the
        # uninterrupted run would (8.4 does not close it here: nothing changes there)
        self._ckpttools_keep_mosaic = bool(state) and state.get("mosaic_closed") is False
        try:
            super().resume_training(ckpt)
        finally:
            self._ckpttools_keep_mosaic = False
        if state:
            restore_state(self, state)
            self._ckpttools_mosaic_closed = bool(state.get("mosaic_closed"))
            restore_image_buffer(self, state.get("image_buffer"))

    def _close_dataloader_mosaic(self):
        if getattr(self, "_ckpttools_keep_mosaic", False):
            return
        super()._close_dataloader_mosaic()
        self._ckpttools_mosaic_closed = True

    # ---- saving ------------------------------------------------------------------------------------------
    def save_model(self):
        real = (self.wdir, self.last, self.best)
        staging = self.wdir / f".ckpttools-staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.wdir, self.last, self.best = staging, staging / real[1].name, staging / real[2].name
        try:
            result = super().save_model()  # Ultralytics writes its files into the staging folder
        finally:
            self.wdir, self.last, self.best = real
        written = sorted(staging.iterdir())
        if written:
            extra = {
                RECORD_KEY: {"history": list(getattr(self, "_ckpttools_history", [])), "data": self._data_record()},
                STATE_KEY: capture_state(self),
            }
            data = _with_digest(written[0], extra)
            for f in written:
                target = self.wdir / f.name
                if target == self.last:
                    keep_previous(target)  # the previous good last.pt survives as last.prev.pt
                with atomic_write(target) as out:
                    out.write(data)
        shutil.rmtree(staging, ignore_errors=True)
        return result

    def _data_record(self) -> dict:
        """What the run started on beyond Ultralytics' own record: the fingerprint of YOLOFuse's infrared
        partners (imagesIR/), which Ultralytics' label cache does not list; taken once, when the run starts, and
        carried on by every resume."""
        if getattr(self, "_ckpttools_data", None) is None:
            try:
                self._ckpttools_data = {"infrared": UR.infrared_fingerprint_of(str(self.args.data))}
            except Exception:  # noqa: BLE001 - a data YAML the reader does not follow: no record, said by preflight
                self._ckpttools_data = {"infrared": None}
        return dict(self._ckpttools_data)

    def final_eval(self):
        import ultralytics.engine.trainer as engine

        if self.last.exists():
            copy_into_place(self.last, self.last.with_name(RESUMABLE_NAME))  # full state, for extend_epochs
        original = engine.strip_optimizer
        engine.strip_optimizer = functools.partial(_atomic_strip, original)
        try:
            return super().final_eval()
        finally:
            engine.strip_optimizer = original


def _atomic_strip(strip, f, s: str = "", updates: dict | None = None) -> dict:
    """Ultralytics' strip_optimizer, run on a copy that then replaces ``f`` atomically (it writes in place),
    without the exact-resume state (a stripped file is for inference) and with a new digest."""
    f = Path(f)
    work = temp_path(f, "strip")
    shutil.copyfile(f, work)
    try:
        out = strip(work, updates=updates)
        data = _with_digest(work, {}, drop=(STATE_KEY,))
        with atomic_write(Path(s) if s else f) as handle:
            handle.write(data)
        return out
    finally:
        work.unlink(missing_ok=True)


def _with_digest(path: Path, extra: dict, drop: tuple[str, ...] = ()) -> bytes:
    """The bytes of checkpoint ``path`` (just written by Ultralytics in this process: trusted) with ``extra``
    keys added and a content digest that ``ckpt verify`` recomputes through its own (inert) reader."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for key in drop:
        ckpt.pop(key, None)
    ckpt.pop(DIGEST_KEY, None)
    ckpt.update(extra)
    first = io.BytesIO()
    torch.save(ckpt, first)
    probe = temp_path(path, "digest")
    probe.write_bytes(first.getvalue())
    try:
        inert = open_checkpoint(probe)
        value = lazy_digest(inert.tree, TensorSource(inert))
    finally:
        probe.unlink(missing_ok=True)
    ckpt[DIGEST_KEY] = {"algorithm": DIGEST_ALGORITHM, "value": value}
    final = io.BytesIO()
    torch.save(ckpt, final)
    return final.getvalue()


# ---- preflight -------------------------------------------------------------------------------------------


def _preflight_resume(last: Path, overrides: dict, allow: set[str]) -> tuple[list[dict], dict | None]:
    """Block a resume that would change the run; return the checkpoint's history plus this resume's event, and
    the data record the run started with."""
    tree = open_checkpoint(last).tree
    rules = rules_for(L.recognise(tree))  # Ultralytics' or YOLOFuse's (which also compares ``ch``)
    if not isinstance(rules, U.UltralyticsRules):  # a file this trainer wrote that is not recognised: its rules
        rules = U.RULES
    recorded = UR.record_of_checkpoint(tree, rules.fields, rules.layout)
    by_key = {key: field for field, key in rules.fields.items()}
    given = {
        by_key[k].replace("-", "_"): v for k, v in overrides.items() if k in by_key and k != "model" and v is not None
    }
    report = preflight(recorded, requested_fields(recorded, given), allow)
    if not report.ok:
        rows = "; ".join(f"{c.field}: {c.recorded!r} -> {c.requested!r} ({c.note})" for c in report.blocked)
        raise ResumeBlocked(
            f"{last}: resume blocked by the preflight: {rows}. Start a new run, or allow with "
            f"safe_trainer(allow_change={','.join(c.field for c in report.blocked)!r}) or "
            f"{ALLOW_ENV}={','.join(c.field for c in report.blocked)}"
        )
    history = list(((tree.get(RECORD_KEY) or {}).get("history")) or [])
    history.append(
        {
            "event": "resume",
            "date": now(),
            "from": str(last),
            "allowed": {c.field: [c.recorded, c.requested] for c in report.allowed},
        }
    )
    data = (tree.get(RECORD_KEY) or {}).get("data") if isinstance(tree.get(RECORD_KEY), dict) else None
    return history, dict(data) if isinstance(data, dict) else None


# ---- extending a finished run ----------------------------------------------------------------------------


def extend_epochs(path: str | os.PathLike, epochs: int, out: str | os.PathLike | None = None) -> Path:
    """A copy of a resumable checkpoint (a finished run's ``last.resumable.pt``) whose run ends at ``epochs``;
    ``YOLO(out).train(resume=True, trainer=SafeDetectionTrainer)`` continues it.  Written atomically to a new
    file (default ``last.extended.pt`` beside it); the input is never modified."""
    path = Path(path)
    out = Path(out) if out else path.with_name("last.extended.pt")
    ckpt = open_checkpoint(path)
    tree = ckpt.tree
    args = tree.get("train_args")
    if not isinstance(args, dict) or tree.get("optimizer") is None:
        raise ValueError(
            f"{path}: not a resumable Ultralytics checkpoint (no train_args / optimizer): a stripped "
            f"final last.pt cannot be extended; use {RESUMABLE_NAME} from the same folder"
        )
    done = int(tree.get("epoch", -1)) + 1
    if epochs <= done:
        raise ValueError(f"{path}: {counted(done, 'epoch')} done already; ask for more than {done}")
    before = args.get("epochs")
    args["epochs"] = int(epochs)
    record = tree.setdefault(RECORD_KEY, {})
    record.setdefault("history", []).append({"event": "extend-epochs", "date": now(), "epochs": [before, epochs]})
    if not refresh_digest(tree, TensorSource(ckpt)):
        tree[DIGEST_KEY] = {"algorithm": DIGEST_ALGORITHM, "value": lazy_digest(tree, TensorSource(ckpt))}
    torchzip.write_file(tree, out, TensorSource(ckpt), replace=False)
    return out
