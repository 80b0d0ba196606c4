"""Option types shared by the command lines of ckpt and fuse-train: values are checked when they are parsed,
so a nonsense value is one line and exit 2 (click's usage error), never a run that starts with it."""

from __future__ import annotations

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
