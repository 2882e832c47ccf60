"""The click command class every dovetail-onnx subcommand uses."""
from __future__ import annotations

import click

from dovetail_onnx.runtime.errors import DovetailError


class Command(click.Command):
    """Every DovetailError becomes one line on stderr and exit status 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DovetailError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
