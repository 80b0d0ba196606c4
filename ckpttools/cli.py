"""`ckpt`: verify, inspect and preflight checkpoints from any trainer, without running their code.

The CLI only parses, calls one operation and renders its result; the operations live in their modules."""

from __future__ import annotations

import contextlib
import functools
import sys
import traceback
from pathlib import Path

import click

from ckpttools import __version__
from ckpttools.report import EXIT_OK, EXIT_PREFLIGHT, EXIT_PROBLEMS, EXIT_USAGE

EPILOG = """\b
Exit codes: 0 all good; 1 problems found; 2 usage error or missing path;
3 preflight blocked a resume.  Finding codes: docs/findings.md."""


class UsageProblem(Exception):
    """Bad input the user can fix; printed as one line, exit 2."""


def _handle_errors(command: str):
    """Turn expected failures into one line on stderr with a documented exit code."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, debug: bool = False, **kwargs):
            from ckpttools.render import stderr
            try:
                code = fn(*args, **kwargs)
            except FileNotFoundError as exc:
                code = _fail(stderr(), command, f"{exc.filename or exc}: no such file or folder", debug)
            except (UsageProblem, IsADirectoryError, PermissionError) as exc:
                code = _fail(stderr(), command, str(exc), debug)
            except Exception as exc:  # noqa: BLE001 - last resort: one line, the traceback only with --debug
                if debug:
                    traceback.print_exc()
                stderr().print(f"ckpt {command}: internal error: {exc.__class__.__name__}: {exc} "
                               "(run with --debug for the traceback)", markup=False)
                code = EXIT_PROBLEMS
            sys.exit(code)
        return click.option("--debug", is_flag=True, help="Show tracebacks.")(inner)
    return wrap


def _fail(console, command: str, message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    console.print(f"ckpt {command}: error: {message}", markup=False)
    return EXIT_USAGE


def _must_exist(*paths: Path) -> None:
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(2, "missing", str(path))


@contextlib.contextmanager
def _progress(enabled: bool, description: str):
    """A rich byte-progress bar on a terminal, nothing when piped; yields the ``(done, total)`` callback or None."""
    from rich.console import Console

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                   console=console, transient=True)
    task = bar.add_task(description, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}, epilog=EPILOG)
@click.version_option(__version__, "--version", prog_name="ckpt")
def main() -> None:
    """Check, compare and migrate PyTorch checkpoints (fuse-train, Ultralytics, Lightning, plain state dicts,
    safetensors, HDF5, torch.distributed.checkpoint folders) without running code from them.

    \b
    ckpt verify last.pt          integrity (CRC32 of every record, digest), safety, consistency
    ckpt inspect last.pt         what is inside: layout, epoch, arguments, keys, sizes, devices
    ckpt diff a.pt b.pt          what differs: keys, shapes, dtypes, values, optimizer, hyperparameters
    ckpt preflight last.pt --data d.yaml --batch 32   would this resume change the run?
    """


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, nothing else.")
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
@_handle_errors("verify")
def verify(path: Path, as_json: bool, strict: bool) -> int:
    """Check that a checkpoint is whole, safe and consistent.  Reads only; never runs or changes the file.

    \b
    Integrity: zip structure, CRC32 of every record (torch.load ignores them), truncation, storage sizes,
    the checkpoint's own content digest.  Safety: every global the pickle names; os / subprocess / eval /
    exec ... are errors.  Consistency: layout keys, optimizer state against parameters, counters, NaN/Inf,
    DDP prefixes.  Exit 0 clean (warnings allowed unless --strict), 1 problems, 2 usage error."""
    from ckpttools.render import print_json, render_verify, stdout
    from ckpttools.verify import verify as run_verify

    _must_exist(path)
    with _progress(not as_json, "verifying") as callback:
        report = run_verify(path, progress=callback)
    if as_json:
        print_json(report.to_dict(strict))
    else:
        render_verify(report, stdout(), strict)
    return report.exit_code(strict)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, nothing else.")
@_handle_errors("inspect")
def inspect(path: Path, as_json: bool) -> int:
    """Summarise a checkpoint: format, layout, epoch / step, best fitness, run arguments, key tree,
    parameter count, bytes by dtype, devices the tensors were saved on, code references."""
    from ckpttools.inspect_ckpt import inspect_checkpoint
    from ckpttools.reader import NotACheckpoint
    from ckpttools.render import print_json, render_inspect, stdout

    _must_exist(path)
    try:
        summary = inspect_checkpoint(path)
    except NotACheckpoint as exc:
        raise UsageProblem(f"{path}: not a checkpoint: {exc}") from None
    if as_json:
        print_json(summary)
    else:
        render_inspect(summary, stdout())
    return EXIT_OK


@main.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--atol", type=float, default=0.0, show_default=True, help="Absolute tolerance per element.")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="Relative tolerance per element (of B).")
@click.option("--section", "sections", multiple=True, type=click.Choice(["model", "ema", "optimizer", "meta"]),
              help="Restrict the comparison (repeatable); default: all.")
@click.option("--no-strip-prefix", is_flag=True, help="Do not normalise module. / _orig_mod. prefixes.")
@click.option("--top", type=int, default=20, show_default=True, help="Show the N largest tensor differences.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, nothing else.")
@_handle_errors("diff")
def diff(a: Path, b: Path, atol: float, rtol: float, sections: tuple[str, ...], no_strip_prefix: bool, top: int,
         as_json: bool) -> int:
    """What differs between checkpoints A and B (any supported formats, also across formats): keys only in one,
    shape / dtype changes, value differences (max abs, mean abs, relative L2, elements outside tolerance,
    bitwise identity, NaN / Inf), optimizer state, and metadata field by field.  Streams one tensor pair at a
    time.  Exit 0 identical or within tolerance, 1 different, 2 trouble (like diff(1))."""
    from ckpttools.diff import DIFFERENT, SECTIONS, diff_checkpoints
    from ckpttools.reader import NotACheckpoint
    from ckpttools.render import print_json, render_diff, stdout

    _must_exist(a, b)
    try:
        with _progress(not as_json, "comparing") as callback:
            report = diff_checkpoints(a, b, atol, rtol, tuple(sections) or SECTIONS, not no_strip_prefix, callback)
    except NotACheckpoint as exc:
        raise UsageProblem(f"not a checkpoint: {exc}") from None
    if as_json:
        print_json(report.to_dict(top))
    else:
        render_diff(report, stdout(), top)
    return EXIT_PROBLEMS if report.verdict == DIFFERENT else EXIT_OK


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", help="data.yaml the resume would use.")
@click.option("--batch", type=int, help="Global batch size.")
@click.option("--world-size", type=int, help="Number of processes.")
@click.option("--lr0", type=float)
@click.option("--lrf", type=float)
@click.option("--momentum", type=float)
@click.option("--weight-decay", type=float)
@click.option("--optimizer")
@click.option("--warmup-epochs", type=float)
@click.option("--schedule")
@click.option("--epochs", type=int)
@click.option("--fusion")
@click.option("--scale")
@click.option("--img-size", type=int)
@click.option("--allow-change", default="", metavar="FIELDS", help="Comma-separated fields allowed to differ.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, nothing else.")
@_handle_errors("preflight")
def preflight(checkpoint: Path, allow_change: str, as_json: bool, **requested) -> int:
    """Would resuming CHECKPOINT with these settings change the run?  Options not given are taken as
    unchanged.  Exit 0 if the resume may go ahead, 3 if it is blocked."""
    from ckpttools.preflight import UnknownField, parse_allow, preflight as run_preflight, render_report
    from ckpttools.preflight_record import NoRunRecord, recorded_fields, requested_fields
    from ckpttools.render import print_json, stderr, stdout

    try:
        allow = parse_allow(allow_change)
    except UnknownField as exc:
        raise UsageProblem(str(exc)) from None
    _must_exist(checkpoint)
    try:
        recorded = recorded_fields(checkpoint)
        wanted = requested_fields(recorded, {k: v for k, v in requested.items() if v is not None})
    except NoRunRecord as exc:
        raise UsageProblem(str(exc)) from None
    report = run_preflight(recorded, wanted, allow)
    if as_json:
        print_json(report.to_dict())
    else:
        render_report(report, stdout(), title=f"preflight of {checkpoint}")
        if report.ok:
            stdout().print("resume may go ahead" + (f" (allowed: {', '.join(c.field for c in report.allowed)})"
                                                    if report.allowed else ""))
        else:
            stderr().print(f"ckpt preflight: blocked: {', '.join(c.field for c in report.blocked)} differ; allow with "
                           f"{report.allow_hint()}", markup=False)
    return EXIT_OK if report.ok else EXIT_PREFLIGHT


if __name__ == "__main__":
    main()
