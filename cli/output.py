"""Terminal output shared by the commands: one-line errors, a stderr console, log setup."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from ..model.errors import MeshError

__all__ = ["stderr", "one_line_errors", "setup_logging", "write"]

F = TypeVar("F", bound=Callable)

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def stderr() -> Console:
    """The console for status lines and errors (stdout carries only the answer)."""
    return Console(stderr=True)


def one_line_errors(fn: F) -> F:
    """Turn mesh's own errors into one line on stderr and a non-zero exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MeshError as e:
            _print_error(e)
        except BaseExceptionGroup as group:  # errors raised inside trio nurseries arrive wrapped
            mesh_errors, _ = group.split(MeshError)
            if mesh_errors is None:
                raise
            _print_error(_first_leaf(mesh_errors))
        except KeyboardInterrupt:
            stderr().print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _print_error(e: BaseException) -> None:
    text = e.one_line() if isinstance(e, MeshError) else str(e)
    stderr().print(f"[bold red]error:[/bold red] {text}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_ERROR) from None


def setup_logging(verbose: int) -> None:
    """-v shows what the node does (INFO), -vv adds mesh's details (DEBUG), -vvv adds libp2p's own.

    A terminal gets rich's columns; a file or a pipe gets one plain line per record, never wrapped, so a
    log can be searched for a whole address or peer id.
    """
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    console = stderr()
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s", datefmt="%H:%M:%S"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if verbose < 3:  # libp2p (and multiaddr) log routine events (dials, DHT reads) at INFO and even WARNING
        handler.addFilter(lambda r: not r.name.startswith(_CHATTY) or r.levelno >= logging.ERROR)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # libp2p's logger does not propagate by default, so its messages would bypass this configuration.
    logging.getLogger("libp2p").propagate = True


_CHATTY = ("libp2p", "multiaddr", "root")


class _PlainFormatter(logging.Formatter):
    """One line per record: newlines inside a message or a traceback are escaped."""

    default_msec_format = "%s.%03d"

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


def write(text: str) -> None:
    """Text to stdout at once (streamed answers)."""
    sys.stdout.write(text)
    sys.stdout.flush()
