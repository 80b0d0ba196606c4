"""Option types shared by the command lines of ckpt and fuse-train: values are checked when they are parsed,
so a nonsense value is one line and exit 2 (click's usage error), never a run that starts with it."""

from __future__ import annotations

import atexit
import gc
import json
import sys

import click

STRIDE = 32  # the largest stride of the detectors (YOLO heads at /8, /16, /32): input sizes are its multiples


class ImageSize(click.ParamType):
    name = "PIXELS"

    def convert(self, value, param, ctx):
        try:
            size = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a whole number of pixels", param, ctx)
        if size < STRIDE or size % STRIDE:
            self.fail(
                f"{size} is not a multiple of {STRIDE} of at least {STRIDE} (the detector's stride); "
                f"e.g. {max(STRIDE, round(size / STRIDE) * STRIDE)}",
                param,
                ctx,
            )
        return size


IMG_SIZE = ImageSize()


class OneLineErrors(click.Group):
    """Click's own usage errors (an unknown option, a value out of range, a missing argument) answered the way
    every other error is: one line on stderr naming the command, exit 2, and with ``--json`` one JSON object on
    stdout, so a script that parses the output always gets one."""

    def shown_path(self, ctx: click.Context) -> str:
        """The command as the user typed it, for the message and its ``--help`` hint."""
        return ctx.command_path

    def main(self, args=None, prog_name=None, **extra):
        if args is None:  # the process's own command line (the console script): the process ends with it
            atexit.register(gc.freeze)  # first registered, so it runs last
        args = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.UsageError as exc:
            command = self.shown_path(exc.ctx) if exc.ctx is not None else (prog_name or self.name or "")
            message = exc.format_message().rstrip(".")
            hint = f" (see {command} --help)" if exc.ctx is not None else ""
            options = args[: args.index("--")] if "--" in args else args  # after "--" come arguments only
            if "--json" in options:
                print(json.dumps({"ok": False, "error": message, "exit_code": exc.exit_code}, indent=2))
            click.echo(f"{command}: error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo(f"{prog_name or self.name}: aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:  # click's file errors and the like: the same one line
            click.echo(f"{prog_name or self.name}: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)
