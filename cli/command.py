"""The click classes every dovetail-onnx command uses: every failure is one line on stderr, never a traceback."""
from __future__ import annotations

import logging
import signal
import threading

import click

from dovetail_onnx.runtime.errors import DovetailError

# Shell convention: 128 + the signal's number.
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds like Ctrl-C does (nothing half-written)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


class NoteHandler(logging.Handler):
    """The library's log records on stderr, a line each: warnings as `note: …`, information as it is. It writes to
    the stderr of the moment (click's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "note: " if record.levelno >= logging.WARNING else ""
        click.echo(prefix + record.getMessage(), err=True)


def show_notes() -> None:
    """Send dovetail_onnx's log records, information and up, to stderr (once per process)."""
    library = logging.getLogger("dovetail_onnx")
    if not any(isinstance(handler, NoteHandler) for handler in library.handlers):
        library.addHandler(NoteHandler())
        library.setLevel(logging.INFO)


class OneLineUsageError(click.UsageError):
    """click's usage error without the usage block: the problem, and where help is."""

    def show(self, file=None) -> None:
        where = f" (see '{self.ctx.command_path} --help')" if self.ctx else ""
        click.echo(f"error: {self.format_message()}{where}", err=True)


class Command(click.Command):
    """A DovetailError becomes `error: …` and exit status 1; Ctrl-C exits 130 and SIGTERM 143, each with one line."""

    def invoke(self, ctx: click.Context):
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
        try:
            return super().invoke(ctx)
        except DovetailError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            click.echo(f"error: {'terminated' if terminated else 'interrupted'}", err=True)
            ctx.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)


class Group(click.Group):
    """Usage errors of the group and of every subcommand (bad option values, unknown commands) on one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None


def _one_line(exc: click.UsageError) -> click.UsageError:
    if isinstance(exc, OneLineUsageError):
        return exc
    error = OneLineUsageError(exc.format_message(), exc.ctx)
    error.exit_code = exc.exit_code
    return error
