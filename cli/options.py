"""Option types and shared options: every value is range-checked when the command line is parsed."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.manifest import MAX_TREE_TOKENS
from dovetail_onnx.runtime.sessions import usable_cores
from dovetail_onnx.runtime.tokenizer import decode_utf8


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and ±inf (a float range lets nan through every bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Threads(click.ParamType):
    """Intra-op threads: 1 to the cores this process may use; more only stalls ONNX Runtime."""

    name = "integer"

    def convert(self, value, param, ctx):
        number = click.INT.convert(value, param, ctx)
        cores = usable_cores()
        if not 1 <= number <= cores:
            self.fail(f"{number} is not from 1 to this machine's {cores} cores", param, ctx)
        return number


TOP_K = click.IntRange(1, MAX_TREE_TOKENS)
DEPTH = click.IntRange(1, MAX_TREE_TOKENS - 1)
TREE_TOKENS = click.IntRange(2, MAX_TREE_TOKENS)
SEED = click.IntRange(0, 2**64 - 1)
MIN_PROB = FiniteFloat(0, 1, max_open=True)


def read_text(path: Path | None) -> str:
    """A prompt file's text, or stdin's when `path` is None."""
    where = f"prompt file {path}" if path else "standard input"
    try:
        data = path.read_bytes() if path else sys.stdin.buffer.read()
    except OSError as exc:
        raise DovetailError(f"cannot read {where} ({exc.strerror or exc})") from exc
    return decode_utf8(data, where)
