"""`ckpt`: verify, inspect and preflight checkpoints from any trainer, without running their code.

The CLI only parses, calls one operation and renders its result; the operations live in their modules."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import click

from ckpttools import __version__
from ckpttools.cli_support import handle_errors, json_option, must_exist, progress_bar
from ckpttools.cli_write import convert, remap, repair
from ckpttools.errors import EXIT_OK, EXIT_PREFLIGHT, EXIT_PROBLEMS
from ckpttools.options import IMG_SIZE, OneLineErrors

BULK_GC_THRESHOLDS = (100_000, 50, 100)  # Python's defaults: (700, 10, 10)

EPILOG = """\b
Exit codes: 0 all good; 1 problems found, or a damaged or unsafe input;
2 usage error, missing path, or not a checkpoint; 3 preflight blocked
a resume; 141 the output's reader went away (`| head`), nothing said.
Finding codes: docs/findings.md.  Safety policy: docs/security.md."""


class CkptCommands(OneLineErrors):
    def main(self, args=None, prog_name=None, **extra):
        if args is None:  # the process's own command line: its numpy, not yet imported, is ours to set up
            # OpenBLAS starts a thread per core when numpy is imported, and each spins for about 0.1 s of CPU
            # before it sleeps.  ckpt needs no BLAS threads (its dot products run on its own threads, a block
            # at a time); on two cores the spin took a core from verify's pass: 24 ms of 0.27 s at 2 GiB
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        return super().main(args, prog_name, **extra)


@click.group(
    cls=CkptCommands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}, epilog=EPILOG
)
@click.version_option(__version__, "--version", prog_name="ckpt")
def main() -> None:
    """Check, compare and migrate PyTorch checkpoints (fuse-train, Ultralytics, Lightning, plain state dicts,
    safetensors, HDF5, torch.distributed.checkpoint folders) without running code from them.

    \b
    ckpt verify last.pt                    whole, safe, consistent?
    ckpt inspect last.pt                   layout, epoch, arguments, keys, sizes
    ckpt diff a.pt b.pt                    keys, shapes, values, optimizer
    ckpt preflight last.pt --batch 32      would this resume change the run?
    ckpt remap last.pt --gpus 1 -o 1.pt    for 1 GPU (or --device cpu)
    ckpt convert last.pt last.h5           HDF5, safetensors, DCP, legacy -> zip
    ckpt repair last.pt -o fixed.pt        salvage a damaged checkpoint
    ckpt audit runs/fuse/exp               was every resume seamless?
    """
    # A command is one short process that builds one large, acyclic description of a checkpoint (200,000
    # tensors are a million objects).  With the default thresholds the cyclic garbage collector walks those
    # objects again and again as they are made: a third of `ckpt verify`'s time on such a file.  Collections
    # 140x rarer still bound the rare cyclic garbage (bench/many_tensors_bench.py measures it).
    gc.set_threshold(*BULK_GC_THRESHOLDS)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@json_option
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
@click.option("--all", "show_all", is_flag=True, help="List every finding (by default a code met often is one line).")
@handle_errors("verify")
def verify(path: Path, as_json: bool, strict: bool, show_all: bool) -> int:
    """Check that a checkpoint is whole, safe and consistent.  Reads only; never runs or changes the file.

    Integrity: zip structure, CRC32 of every record (torch.load ignores them), truncation, storage sizes,
    the checkpoint's own content digest.  Safety: every global the pickle names; os / subprocess / eval /
    exec ... are errors.  Consistency: layout keys, optimizer state against parameters, counters, NaN/Inf,
    DDP prefixes.  Exit 0 clean (warnings allowed unless --strict), 1 problems, 2 usage error."""
    from ckpttools.commands.verify import verify as run_verify
    from ckpttools.render import print_json, render_verify, stdout

    must_exist(path)
    with progress_bar(not as_json, "verifying") as callback:
        report = run_verify(path, progress=callback)
    if as_json:
        print_json(report.to_dict(strict))
    else:
        render_verify(report, stdout(), strict, show_all)
    return report.exit_code(strict)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@json_option
@handle_errors("inspect")
def inspect(path: Path, as_json: bool) -> int:
    """Summarise a checkpoint: format, layout, epoch / step, best fitness, run arguments, key tree,
    parameter count, bytes by dtype, devices the tensors were saved on, code references."""
    from ckpttools.commands.inspect import inspect_checkpoint
    from ckpttools.render import print_json, render_inspect, stdout

    must_exist(path)
    summary = inspect_checkpoint(path)
    if as_json:
        print_json(summary)
    else:
        render_inspect(summary, stdout())
    return EXIT_OK


@main.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option(
    "--atol", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Absolute tolerance per element."
)
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Relative tolerance per element (of B).",
)
@click.option(
    "--section",
    "sections",
    multiple=True,
    type=click.Choice(["model", "ema", "optimizer", "meta"]),
    help="Restrict the comparison (repeatable); default: all.",
)
@click.option("--no-strip-prefix", is_flag=True, help="Do not normalise module. / _orig_mod. prefixes.")
@click.option(
    "--top", type=click.IntRange(min=1), default=20, show_default=True, help="Show the N largest tensor differences."
)
@click.option(
    "--exact",
    is_flag=True,
    help="Read and compare every tensor, also those whose zip records have the "
    "same size and CRC32 on both sides (by default those count as equal without being read).",
)
@json_option
@handle_errors("diff")
def diff(
    a: Path,
    b: Path,
    atol: float,
    rtol: float,
    sections: tuple[str, ...],
    no_strip_prefix: bool,
    top: int,
    exact: bool,
    as_json: bool,
) -> int:
    """What differs between checkpoints A and B (any supported formats, also across formats): keys only in one,
    shape / dtype changes, value differences (max abs, mean abs, relative L2, elements outside tolerance,
    bitwise identity, NaN / Inf), optimizer state, and metadata field by field.  Streams one tensor pair at a
    time.  Exit 0 identical or within tolerance, 1 different, 2 trouble (like diff(1))."""
    from ckpttools.commands.diff import DIFFERENT, SECTIONS, diff_checkpoints
    from ckpttools.render_diff import show_diff

    must_exist(a, b)
    with progress_bar(not as_json, "comparing") as callback:
        report = diff_checkpoints(a, b, atol, rtol, tuple(sections) or SECTIONS, not no_strip_prefix, callback, exact)
    show_diff(report, as_json, top)
    return EXIT_PROBLEMS if report.verdict == DIFFERENT else EXIT_OK


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", help="data.yaml or dataset folder the resume would use.")
@click.option("--batch", type=click.IntRange(min=1), help="Global batch size.")
@click.option("--world-size", type=click.IntRange(min=1), help="Number of processes.")
@click.option("--lr0", type=click.FloatRange(min=0, min_open=True))
@click.option("--lrf", type=click.FloatRange(min=0, min_open=True))
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True))
@click.option("--weight-decay", type=click.FloatRange(min=0))
@click.option("--optimizer")
@click.option("--warmup-epochs", type=click.FloatRange(min=0))
@click.option("--schedule")
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--fusion")
@click.option("--scale")
@click.option("--img-size", type=IMG_SIZE, help="Input size (Ultralytics: imgsz).")
@click.option("--model", help="Ultralytics: the model YAML the resume would name (compared by file name).")
@click.option("--ch", type=click.IntRange(min=1), help="YOLOFuse: input channels (6 = RGB + infrared, 3 = RGB).")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), help="Ultralytics: share of training images.")
@click.option("--allow-change", default="", metavar="FIELDS", help="Comma-separated fields allowed to differ.")
@json_option
@handle_errors("preflight")
def preflight(checkpoint: Path, allow_change: str, as_json: bool, **requested) -> int:
    """Would resuming CHECKPOINT with these settings change the run?  Options not given are taken as
    unchanged.  Exit 0 if the resume may go ahead, 3 if it is blocked."""
    from ckpttools.commands.preflight import parse_allow, recorded_fields, requested_fields
    from ckpttools.commands.preflight import preflight as run_preflight
    from ckpttools.render import print_json, render_preflight, stderr, stdout

    allow = parse_allow(allow_change)
    must_exist(checkpoint)
    recorded = recorded_fields(checkpoint)
    wanted = requested_fields(recorded, {k: v for k, v in requested.items() if v is not None})
    report = run_preflight(recorded, wanted, allow)
    if as_json:
        print_json(report.to_dict())
    else:
        render_preflight(report, stdout(), title=f"preflight of {checkpoint}")
        if report.ok:
            stdout().print(
                "resume may go ahead"
                + (f" (allowed: {', '.join(c.field for c in report.allowed)})" if report.allowed else "")
            )
        else:
            stderr().print(
                f"ckpt preflight: blocked: {', '.join(c.field for c in report.blocked)} "
                f"{'differs' if len(report.blocked) == 1 else 'differ'}; allow with "
                f"{report.allow_hint()}",
                markup=False,
            )
    return EXIT_OK if report.ok else EXIT_PREFLIGHT


@main.command()
@click.argument("path", metavar="RUN_DIR_OR_CKPT", type=click.Path(path_type=Path))
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    metavar="OUT.png",
    help="Also draw the curves with every boundary marked.",
)
@json_option
@handle_errors("audit")
def audit(path: Path, plot_path: Path | None, as_json: bool) -> int:
    """Was every resume of a run seamless?  The run's lineage (resumes, allowed changes, remaps, repairs, from
    the checkpoint's history) and, at each resume boundary, whether the epoch counters go on by one, the
    learning rate continues its schedule, and the losses do not jump beyond the run's own variation.  Also
    repeated or missing epochs in results.csv and TensorBoard steps written twice.  Works on fuse-train and
    Ultralytics run folders.  Exit 0 seamless, 1 a boundary looks broken, 2 not a run folder."""
    from ckpttools.commands.audit import audit as run_audit
    from ckpttools.commands.audit import plot
    from ckpttools.render import print_json, render_audit, stdout

    must_exist(path)
    report = run_audit(path)
    if plot_path is not None:
        plot(report, plot_path)
    if as_json:
        print_json(report.to_dict())
    else:
        render_audit(report, stdout())
    return EXIT_OK if report.ok else EXIT_PROBLEMS


main.add_command(convert)
main.add_command(repair)
main.add_command(remap)

if __name__ == "__main__":
    main()
