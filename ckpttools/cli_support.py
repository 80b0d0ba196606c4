"""What every `ckpt` command shares around its operation: errors turned into one line and an exit code (with
--json, one JSON object), byte progress on a terminal, and the summary line of a command that writes a file.
Rich and the renderers are imported when used (``ckpt --help`` stays lean)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from pathlib import Path

import click

from ckpttools.errors import EXIT_BROKEN_PIPE, EXIT_PROBLEMS, CkptError, MissingPath
from ckpttools.report import counted, shorten

# the options several commands share, declared once (click builds a new Option each time one decorates)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object, nothing else.")
force_option = click.option("--force", is_flag=True, help="Replace OUT if it exists.")


def output_option(made: str, source: str):
    """``-o/--output OUT`` of a command that writes a new checkpoint beside its untouched input."""
    return click.option(
        "-o",
        "--output",
        "out",
        required=True,
        type=click.Path(path_type=Path),
        help=f"Where the {made} checkpoint goes (a new path; {source} is never modified).",
    )


def handle_errors(command: str):
    """The one place errors are caught: a ``CkptError`` becomes one line on stderr (and, with --json, one JSON
    object on stdout) with its exit code; anything else is a bug, shown as an internal error."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, debug: bool = False, **kwargs):
            try:
                code = fn(*args, **kwargs)
            except CkptError as exc:
                code = _fail(command, _first_line(exc), exc.exit_code, debug, kwargs.get("as_json", False))
            except BrokenPipeError:  # whoever read our output stopped (`ckpt verify x | head`): nothing to say
                _discard_stdout()
                code = EXIT_BROKEN_PIPE
            except FileNotFoundError as exc:  # a path that vanished while we worked
                code = _fail(
                    command,
                    f"{exc.filename or exc}: no such file or folder",
                    MissingPath.exit_code,
                    debug,
                    kwargs.get("as_json", False),
                )
            except OSError as exc:  # the disk is full, a permission is missing: say which file
                code = _fail(
                    command,
                    f"{exc.filename or ''}: {exc.strerror or _first_line(exc)}".lstrip(": "),
                    EXIT_PROBLEMS,
                    debug,
                    kwargs.get("as_json", False),
                )
            except Exception as exc:  # noqa: BLE001 - last resort: one line, the traceback only with --debug
                code = _fail(
                    command,
                    f"internal error: {exc.__class__.__name__}: {_first_line(exc)} (run with "
                    "--debug for the traceback)",
                    EXIT_PROBLEMS,
                    debug,
                    kwargs.get("as_json", False),
                    prefix="",
                )
            sys.exit(code)

        return click.option("--debug", is_flag=True, help="Show tracebacks.")(inner)

    return wrap


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what could not be written is not
    reported as a second BrokenPipeError on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout already closed or not a real file: nothing to redirect
        pass


def _first_line(exc: BaseException) -> str:
    """Some libraries put a whole traceback into their exception's text (torch's DCP does): one line of it."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return shorten(lines[0], 1000) if lines else exc.__class__.__name__


def _fail(command: str, message: str, code: int, debug: bool, as_json: bool, prefix: str = "error: ") -> int:
    from ckpttools.render import print_json, stderr

    if debug:
        traceback.print_exc()
    if as_json:
        print_json({"ok": False, "error": message, "exit_code": code})
    stderr().print(f"ckpt {command}: {prefix}{message}", markup=False, highlight=False)
    return code


def must_exist(*paths: Path) -> None:
    for path in paths:
        if not path.exists() and not path.is_symlink():
            raise MissingPath(path)


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str):
    """A rich byte-progress bar on a terminal, nothing when piped; yields the ``(done, total)`` callback or None."""
    from rich.console import Console

    console = Console(stderr=True, emoji=False)
    if not enabled or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(
        TextColumn(description),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = bar.add_task(description, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


def print_rewrite(result: dict, as_json: bool, verb: str) -> None:
    from ckpttools.render import human_bytes, print_json, stdout

    if as_json:
        print_json(result)
        return
    out = stdout()
    size = f": {counted(result['tensors'], 'tensor')}, {human_bytes(result['bytes'])}" if "tensors" in result else ""
    # one line each, however long the paths: the terminal wraps them; a log file keeps them whole
    out.print(
        f"{verb} {result['input']} -> {result['output']}"
        + size
        + (f" in {result['seconds']:.2f} s" if "seconds" in result else ""),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    for note in result.get("notes", []):
        out.print(f"  note: {note}", markup=False, highlight=False, soft_wrap=True)


def bytes_callback(progress):
    """Adapt the (done, total) progress callback to per-block byte counts."""
    if progress is None:
        return None
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        progress(done, None)

    return on_bytes
