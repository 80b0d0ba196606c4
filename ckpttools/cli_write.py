"""The `ckpt` commands that write a file: convert, repair and remap (registered on the `ckpt` group in
``cli.py``).  Each parses its options, calls its operation (imported when the command runs: `ckpt --help` stays
lean) and prints one summary line per output, or one JSON object."""

from __future__ import annotations

from pathlib import Path

import click

from ckpttools.cli_support import (
    bytes_callback,
    force_option,
    handle_errors,
    json_option,
    must_exist,
    output_option,
    print_rewrite,
    progress_bar,
)
from ckpttools.errors import EXIT_OK, EXIT_PROBLEMS


@click.command()
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@click.argument("out", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--to",
    type=click.Choice(["pt", "h5", "safetensors", "dcp"]),
    help="Output format (default: from OUT's "
    "suffix: .pt/.pth/.ckpt, .h5, .safetensors; a path without suffix is a DCP folder).",
)
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), help="Cast floating tensors.")
@click.option(
    "--weights-only",
    is_flag=True,
    help="Keep only the model weights (as a flat state dict), like Ultralytics' strip_optimizer: for deployment.",
)
@click.option("--ema", is_flag=True, help="Take the EMA weights instead of the raw model weights.")
@click.option("--compress", is_flag=True, help="HDF5: gzip-compress datasets (smaller, slower).")
@click.option(
    "--world-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="M",
    help="DCP output: write it as M ranks do (M local gloo processes, tensors sharded along dim 0).",
)
@force_option
@click.option(
    "--allow-unsafe",
    is_flag=True,
    help="Convert an input whose pickle would run code: only its data is "
    "written (every object as its plain state), never its code references.",
)
@json_option
@handle_errors("convert")
def convert(
    src: Path,
    out: Path,
    to: str | None,
    dtype: str | None,
    weights_only: bool,
    ema: bool,
    compress: bool,
    world_size: int,
    force: bool,
    allow_unsafe: bool,
    as_json: bool,
) -> int:
    """Write checkpoint IN in another format as OUT, one tensor at a time; IN is never modified.

    \b
    ckpt convert last.pt last.h5           whole checkpoint to HDF5 (lossless)
    ckpt convert last.pt w.safetensors --ema   EMA weights for deployment
    ckpt convert last.pt fp16.pt --weights-only --dtype fp16
    ckpt convert dcp_folder/ one.pt        a DCP folder to one file
    ckpt convert last.pt dcp_folder --to dcp   and back (--world-size 4: sharded)
    ckpt convert old_legacy.pt new.pt      pre-1.6 torch format to zip

    Reads Ultralytics, Lightning and plain state dicts without their libraries; what a target format
    cannot hold (pickled classes in HDF5, optimizer state in safetensors) is listed as a note."""
    from ckpttools.commands.convert import convert as run_convert

    must_exist(src)
    with progress_bar(not as_json, "converting") as callback:
        result = run_convert(
            src, out, to, dtype, weights_only, ema, compress, force, bytes_callback(callback), world_size, allow_unsafe
        )
    print_rewrite(result.to_dict(), as_json, "converted")
    return EXIT_OK


@click.command()
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@output_option("repaired", "IN")
@click.option(
    "--from",
    "from_",
    type=click.Path(path_type=Path),
    metavar="OTHER",
    help="Fill lost tensors from this checkpoint (e.g. last.prev.pt or an epochN.pt).",
)
@click.option("--keep-prefix", is_flag=True, help="Do not strip module. / _orig_mod. from weight names.")
@force_option
@click.option(
    "--allow-unsafe",
    is_flag=True,
    help="Repair an input whose pickle would run code: only its data is written, never its code references.",
)
@json_option
@handle_errors("repair")
def repair(
    src: Path, out: Path, from_: Path | None, keep_prefix: bool, force: bool, allow_unsafe: bool, as_json: bool
) -> int:
    """Mend a damaged checkpoint into OUT and say exactly what could not be mended.

    \b
    ckpt repair last.pt -o fixed.pt        salvage a truncated or damaged file
    ckpt repair last.pt -o fixed.pt --from last.prev.pt
                                           fill lost tensors from the previous one

    Recovers every record whose bytes pass their CRC32 (scanning local headers when the zip's end is gone),
    strips DDP / torch.compile prefixes, rebuilds a missing or stale digest.  OUT is verified before it is
    written; if it would not pass `ckpt verify`, nothing is written.  Exit 0 repaired, 1 not repairable
    (the lost tensors are listed), 2 usage error."""
    from ckpttools.commands.repair import repair as run_repair
    from ckpttools.render import print_json, stderr, stdout

    must_exist(src)
    with progress_bar(not as_json, "repairing") as callback:
        result = run_repair(src, out, from_, not keep_prefix, force, bytes_callback(callback), allow_unsafe)
    if as_json:
        print_json(result.to_dict())
        return EXIT_OK if result.repaired else EXIT_PROBLEMS
    for line in result.actions:
        stdout().print(f"  {line}", markup=False, highlight=False)
    if result.lost:
        from ckpttools.render import lost_summary

        for line in lost_summary(result.lost):
            stdout().print(f"  {line}", markup=False, highlight=False)
    if result.repaired:
        stdout().print(f"repaired {src} -> {out} (passes ckpt verify)", markup=False, highlight=False)
        return EXIT_OK
    stderr().print(f"ckpt repair: {src}: not repaired: {'; '.join(result.problems)}", markup=False, highlight=False)
    return EXIT_PROBLEMS


@click.command()
@click.argument("src", metavar="CKPT", type=click.Path(path_type=Path))
@output_option("remapped", "CKPT")
@click.option(
    "--gpus", type=click.IntRange(min=1), metavar="M", help="Number of processes (GPUs) the run will resume on."
)
@click.option("--device", metavar="cpu|cuda:K", help="Device every tensor is loaded onto by plain torch.load.")
@click.option(
    "--add-module-prefix",
    is_flag=True,
    help="Other trainers' state dicts: add DDP's module. prefix instead of stripping it.",
)
@force_option
@click.option(
    "--allow-unsafe",
    is_flag=True,
    help="Remap an input whose pickle would run code: only its data is written, never its code references.",
)
@json_option
@handle_errors("remap")
def remap(
    src: Path,
    out: Path,
    gpus: int | None,
    device: str | None,
    add_module_prefix: bool,
    force: bool,
    allow_unsafe: bool,
    as_json: bool,
) -> int:
    """Rewrite a checkpoint for another number of processes and/or another device.

    \b
    ckpt remap last.pt --gpus 1 -o 1gpu.pt     saved on 4 GPUs, resume on 1
    ckpt remap last.pt --device cpu -o cpu.pt  saved on cuda, load on a CPU box

    fuse-train checkpoints: the global batch is kept (per-rank batch = batch / M), the data position is a
    global step and carries over, existing ranks keep their RNG streams and new ranks get streams derived
    from (seed, step, rank), and the change is recorded in the history, so `fuse-train --resume` on M
    processes passes preflight with no --allow-change.  Other layouts: the module. prefix is stripped (or
    added); what cannot be carried is listed."""
    from ckpttools.commands.remap import remap as run_remap

    must_exist(src)
    with progress_bar(not as_json, "remapping") as callback:
        result = run_remap(src, out, gpus, device, add_module_prefix, force, bytes_callback(callback), allow_unsafe)
    print_rewrite(result.to_dict(), as_json, "remapped")
    return EXIT_OK
