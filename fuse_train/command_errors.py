"""How fuse-train's commands end: bad input is one line on stderr and exit 2, anything unexpected one line and
exit 1 (``--debug``: the traceback); with ``--json`` also one JSON object on stdout.  Exit codes are
``ckpttools.errors``' table, shared by both programs."""

from __future__ import annotations

import functools
import json
import sys
import traceback

import click
from rich.console import Console

from ckpttools.datasets.spec import DatasetError
from ckpttools.errors import EXIT_PROBLEMS, EXIT_USAGE
from fuse_train.config import ConfigError
from fuse_train.failures import InferenceError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
DEBUG = click.option("--debug", is_flag=True, help="Show tracebacks.")


def one_line(exc: BaseException) -> str:
    """The useful line of an error; a DataLoader worker wraps the original message in a traceback."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else exc.__class__.__name__


def one_line_errors(func):
    """Bad input is one line on stderr and exit 2; anything unexpected one line and exit 1 (--debug: traceback)."""

    @functools.wraps(func)
    def wrapper(*args, debug: bool = False, **kwargs):
        err = Console(stderr=True, soft_wrap=True, emoji=False)
        try:
            code = func(*args, **kwargs)
        except (DatasetError, InferenceError, ConfigError) as exc:
            code = _fail(one_line(exc), EXIT_USAGE, debug, kwargs.get("as_json", False), err)
        except Exception as exc:  # noqa: BLE001 - the top-level catch that turns failures into one line
            message = f"{exc.__class__.__name__}: {one_line(exc)} (run with --debug for the traceback)"
            code = _fail(message, EXIT_PROBLEMS, debug, kwargs.get("as_json", False), err)
        sys.exit(code or 0)

    return wrapper


def _fail(message: str, code: int, debug: bool, as_json: bool, err: Console) -> int:
    """One line on stderr; with --json also the one JSON object the README promises on stdout."""
    if debug:
        traceback.print_exc()
    if as_json:
        print(json.dumps({"ok": False, "error": message, "exit_code": code}, indent=1))
    context = click.get_current_context(silent=True)  # "fuse-train predict", as click names usage errors
    err.print(f"{context.command_path if context else 'fuse-train'}: error: {message}", markup=False, highlight=False)
    return code
