"""Terminal output shared by the commands: one-line errors, a stderr console, log setup."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from mesh.model.errors import MeshError

F = TypeVar("F", bound=Callable)

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def stderr() -> Console:
    return Console(stderr=True)


def one_line_errors(fn: F) -> F:
    """Turn mesh's own errors into one line on stderr and a non-zero exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MeshError as e:
            stderr().print(f"[bold red]error:[/bold red] {e.one_line()}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            stderr().print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: int) -> None:
    """-v shows what the node does (INFO), -vv adds wire-level detail (DEBUG)."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[RichHandler(console=stderr(), show_path=False)], force=True)
    if verbose < 3:  # libp2p's own loggers are very chatty below WARNING
        logging.getLogger("libp2p").setLevel(max(level, logging.WARNING))


def parse_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name.lower() not in table:
        raise typer.BadParameter(f"{name!r} is not one of float32, bfloat16")
    return table[name.lower()]


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
