"""Every finding code ``ckpt verify`` (and the readers) can report: severity, meaning, what to do.

The one source of ``docs/findings.md`` (``python -m ckpttools.findings > docs/findings.md`` writes it; a test
checks the committed page is current), and ``Report.add`` refuses a code that is not here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FindingKind:
    severity: str
    meaning: str
    remedy: str = ""


FINDINGS: dict[str, FindingKind] = {
    "file.not-a-checkpoint": FindingKind(
        "error", "empty file, random bytes, an image, text, a folder without `.metadata`", "check the path"
    ),
    "file.unreadable": FindingKind(
        "error", "reading stopped on damage no other check anticipated", "use the previous checkpoint (`last.prev.pt`)"
    ),
    "zip.no-central-directory": FindingKind(
        "error",
        "the zip's end records are missing: a truncated or half-written file. The complete records found by "
        "scanning are counted",
        "`ckpt repair` salvages intact records",
    ),
    "zip.record-truncated": FindingKind("error", "a record runs past the end of the file", "as above"),
    "zip.structure": FindingKind(
        "error",
        "the file's bytes do not add up: gaps, a damaged end record, zip64 record, padding, extra field, or a "
        "central-directory field that differs from every other entry's",
        "the file is damaged",
    ),
    "zip.header-mismatch": FindingKind(
        "error", "a local header or data descriptor disagrees with the central directory", "the file is damaged"
    ),
    "zip.crc-mismatch": FindingKind(
        "error",
        "a record's bytes do not match its CRC32: flipped bits. `torch.load` does not check this and would load "
        "wrong values. `where` names the tensors in the record",
        "restore from a good copy",
    ),
    "zip.no-pickle": FindingKind("error", "no `data.pkl` record: not a `torch.save` file, or the record is lost"),
    "zip.record-missing": FindingKind("error", "the pickle names a storage whose record is absent"),
    "zip.unreferenced-record": FindingKind("warning", "a storage record the pickle does not use"),
    "zip.extra-record": FindingKind("info", "a record `torch.save` does not write"),
    "zip.big-endian": FindingKind("warning", "saved on a big-endian machine"),
    "pickle.damaged": FindingKind(
        "error", "`data.pkl` fails its CRC32; it is not unpickled (what it names is still judged)"
    ),
    "pickle.unreadable": FindingKind("error", "the pickle cannot be parsed"),
    "safety.dangerous-reference": FindingKind(
        "error",
        "the pickle would run code: it calls something not on the allow-list (REDUCE / INST / OBJ), names a "
        "module a checkpoint has no reason to name (`os`, `subprocess`, `builtins` other than plain types, ...), "
        "walks a dotted name through one, uses an EXT code, computes a name at load time, or cannot be followed "
        "to its end. `where` names the pickle; the message says what `torch.load(weights_only=False)` would do. "
        "See [security.md](security.md)",
        "do not load this file with `torch.load(weights_only=False)`",
    ),
    "safety.code-reference": FindingKind(
        "warning",
        "the pickle builds an object of a class outside the allow-list (NEWOBJ, e.g. Ultralytics' "
        "`DetectionModel`, `argparse.Namespace`) or only names one: `torch.load(weights_only=False)` would import "
        "that library. Read here as an inert placeholder",
        "convert to weights only (`ckpt convert --weights-only`) to share it",
    ),
    "storage.size-mismatch": FindingKind(
        "error", "a storage record's size does not match the element count × dtype the pickle records"
    ),
    "tensor.out-of-bounds": FindingKind("error", "a tensor view needs more elements than its storage holds"),
    "values.nonfinite": FindingKind(
        "error",
        "NaN or Inf values in a floating-point storage (weights or optimizer state), in every float dtype torch "
        "has by its own bit patterns (IEEE exponents, the NaNs of the fp8 formats, both parts of a complex); "
        "`where` names the tensors",
        "resume from an earlier checkpoint",
    ),
    "digest.mismatch": FindingKind(
        "error",
        "the checkpoint's own content digest (`digest`, see checkpoint-format.md) does not match its content: it "
        "was changed after saving",
    ),
    "digest.missing": FindingKind(
        "warning",
        "a fuse-train checkpoint file without a digest (DCP folders have none: their items carry CRC32s)",
        "`ckpt repair` rebuilds it",
    ),
    "digest.unknown": FindingKind("warning", "a digest algorithm this version does not know"),
    "digest.unreadable": FindingKind("error", "the digest could not be computed (a damaged tensor view)"),
    "layout.missing-key": FindingKind(
        "error",
        "a key the recognised layout needs is absent (fuse-train: format, model, ema, optimizer, progress, rng, "
        "...; Ultralytics: epoch, model; Lightning: state_dict, epoch, global_step)",
    ),
    "layout.unknown": FindingKind("warning", "not a layout this tool knows; bytes and safety were still checked"),
    "pt2.program": FindingKind("info", "a torch.export program archive: weights listed, the program named, not judged"),
    "pt2.bad-config": FindingKind(
        "error", "a .pt2 archive's weights config is unreadable or names a record / dtype that is not there"
    ),
    "file.changed-while-reading": FindingKind(
        "error",
        "the file was replaced at every one of 4 reads (a writer saving it that often): not verified, and nothing "
        "the mixed reads found is reported",
        "verify a copy, or once the writer has stopped",
    ),
    "layout.bad-metadata": FindingKind("error", "a folder layout's JSON metadata (trainer_state.json) cannot be read"),
    "layout.torchscript": FindingKind(
        "warning", "a TorchScript program (torch.jit.save): torch.jit.load runs its code/; listed, not judged"
    ),
    "ultralytics.stripped": FindingKind("info", "an Ultralytics final checkpoint (epoch -1, no optimizer)"),
    "counters.bad-epoch": FindingKind("error", "`epoch` is not an integer >= -1"),
    "counters.bad-progress": FindingKind("error", "a fuse-train `progress` record is incomplete"),
    "counters.inconsistent": FindingKind(
        "error",
        "fuse-train counters disagree: `global_step` vs epoch × steps + step in epoch, `epoch` vs "
        "`progress.epoch`, result rows vs finished epochs",
    ),
    "optimizer.param-count": FindingKind(
        "error", "the optimizer holds more parameters than the model has floating tensors"
    ),
    "optimizer.partial": FindingKind(
        "info",
        "the optimizer holds fewer parameters than the model has floating tensors: frozen parameters (fine-tuning "
        "with a frozen backbone) and floating buffers are not optimised. The shapes of its state are still "
        "compared with the model",
    ),
    "optimizer.shape-mismatch": FindingKind(
        "error", "optimizer state (momentum / Adam moments) for a parameter shape the model does not have"
    ),
    "keys.prefix": FindingKind(
        "warning",
        "every weight name starts with `module.` (DDP) or `_orig_mod.` (`torch.compile`)",
        "`ckpt repair IN -o OUT` strips it",
    ),
    "legacy.truncated": FindingKind("error", "a legacy (pre-1.6) torch file whose storage data runs past the end"),
    "safetensors.size-mismatch": FindingKind(
        "error", "a safetensors header entry whose byte range does not fit its dtype and shape"
    ),
    "safetensors.truncated": FindingKind("error", "a safetensors tensor's data runs past the end of the file"),
    "safetensors.overlap": FindingKind("error", "two safetensors tensors share bytes"),
    "storage.unreadable": FindingKind("error", "a storage could not be read (HDF5: a fletcher32 checksum failure)"),
    "hdf5.cycle": FindingKind(
        "error", "an HDF5 group that links back to a group containing it (no checkpoint tree has that)"
    ),
    "hdf5.dtype": FindingKind("error", "an HDF5 dataset whose `dtype` attribute names no tensor dtype"),
    "hdf5.unreadable": FindingKind(
        "error",
        "the HDF5 library could not read the file's metadata: a checksum failed, a link or object is damaged, or "
        "it stopped making progress (a loop) or crashed; the metadata is read in a separate process, so this "
        "one never enters the loop",
        "the file is damaged: convert again from the source checkpoint",
    ),
    "dcp.metadata-unreadable": FindingKind(
        "error", "a torch.distributed.checkpoint folder's `.metadata` cannot be parsed"
    ),
    "dcp.file-missing": FindingKind(
        "error", "a `.distcp` file named by `.metadata` is absent", "copy the whole folder"
    ),
    "dcp.truncated": FindingKind("error", "an item's bytes run past the end of its `.distcp` file"),
    "dcp.item-missing": FindingKind("error", "a name in `.metadata` with no data"),
    "dcp.chunks-incomplete": FindingKind("error", "a sharded tensor's chunks do not add up to its size"),
    "dcp.path-outside": FindingKind(
        "error",
        "`.metadata` sends an item to a path outside the folder (`..`, an absolute path, a link out); torch's "
        "`dcp.load` would read it. Not read",
        "use a folder from a source you trust",
    ),
    "hf.index-path-outside": FindingKind(
        "error",
        "a Hugging Face shard index (`*.index.json`) names a file outside the folder; Transformers would load it. "
        "Not read",
        "use a folder from a source you trust",
    ),
    "hf.index-file-missing": FindingKind(
        "error", "a shard named by the Hugging Face index is not in the folder", "copy the whole folder"
    ),
    "hf.index-unreadable": FindingKind(
        "error", "the Hugging Face shard index is not a JSON object with a `weight_map` (or is implausibly large)"
    ),
    "folder.path-outside": FindingKind(
        "error",
        "a checkpoint folder's file is a link to outside the folder (or DeepSpeed's `latest` names one); not read",
        "copy the files themselves into the folder",
    ),
    "safetensors.duplicate-name": FindingKind(
        "error", "one tensor name appears twice in a safetensors header (JSON readers disagree on which one wins)"
    ),
    "safetensors.bad-entry": FindingKind(
        "error",
        "a safetensors header entry that is not a tensor description: unknown dtype, shape or offsets not lists "
        "of non-negative integers",
    ),
    "dcp.empty": FindingKind("warning", "a DCP folder without tensors"),
    "zip.crc-not-computed": FindingKind(
        "warning",
        "records whose CRC32 field is 0 although they hold data: the writer did not compute checksums (torch.save "
        "with `torch.utils.serialization.config.save.compute_crc32 = False`). Their bytes cannot be verified; "
        "structure, digest, values and safety are still checked",
        "save with checksums on to make the bytes verifiable",
    ),
    "tensor.unknown-dtype": FindingKind(
        "error",
        "a tensor of a torch dtype this version of ckpttools does not know (newer than its table): not damage; "
        "nothing is guessed and nothing is written from it",
        "use a ckpttools release that knows the dtype",
    ),
    "zip.overlap": FindingKind(
        "error",
        "a central-directory entry whose record overlaps an earlier one or comes before it: many names for the "
        "same bytes (a zip bomb) or a damaged directory. The entry's bytes are not read",
        "do not load this file",
    ),
    "zip.duplicate-name": FindingKind(
        "error",
        "two records of the same name: `torch.load` may read either, so the file means two things",
        "do not load this file",
    ),
}

HEADER = (
    "# `ckpt verify` findings\n"
    "\n"
    "Every finding has a severity, a stable code, a message and a `where` (a record name, a tensor path like\n"
    "`model/backbone.stem.0.weight`, or a part of the file). `ckpt verify` exits 1 when any **error** is found,\n"
    "and also on **warnings** with `--strict`; **info** never fails.\n"
    "\n"
)


def markdown() -> str:
    rows = ["| code | severity | meaning | what to do |", "|---|---|---|---|"]
    rows += [f"| `{code}` | {k.severity} | {k.meaning} | {k.remedy} |" for code, k in FINDINGS.items()]
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
