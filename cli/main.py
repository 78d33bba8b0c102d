"""The `mesh` command line: thin wrappers that parse options and call into mesh's packages."""

from __future__ import annotations

import typer

from .api import api
from .chat import chat
from .finetune import finetune
from .generate import generate
from .keygen import keygen
from .serve import serve
from .status import status

__all__ = ["version", "demo"]

app = typer.Typer(help="mesh: run and fine-tune large language models across a swarm of devices.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

app.command()(serve)
app.command()(status)
app.command()(generate)
app.command()(chat)
app.command()(finetune)
app.command()(keygen)
app.command()(api)


@app.command()
def version() -> None:
    """Print the mesh version."""
    from .. import __version__

    typer.echo(__version__)


@app.command()
def demo(
    prompt: str = typer.Option("What is the capital of France? Answer in one sentence.", "--prompt", "-p"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n", min=1),
    servers: int = typer.Option(3, min=1, max=10, help="How many server processes to start."),
) -> None:
    """Start a swarm of SmolLM2-135M-Instruct servers on this machine, answer a prompt through it, stop it."""
    from .localswarm import LocalSwarm
    from .output import one_line_errors, stderr
    from ..model.sources import resolve_model

    @one_line_errors
    def run() -> None:
        source = resolve_model("smollm2")  # convert once here rather than in every server
        with stderr().status(f"starting {servers} servers on this machine"):
            swarm = LocalSwarm("smollm2", source.num_blocks, servers).start()
        try:
            for (a, b), log in zip(swarm.spans, swarm.logs):
                stderr().print(f"[dim]server for blocks {a}:{b} (log: {log})[/dim]", highlight=False)
            peers = [arg for p in swarm.initial_peers for arg in ("--initial-peers", p)]
            # through the command line, so every option `mesh chat` has takes its default
            typer.main.get_command(app).main(["chat", "smollm2", "-p", prompt, "-n", str(max_new_tokens), *peers],
                                             prog_name="mesh", standalone_mode=False)
        finally:
            with stderr().status("stopping the servers"):
                swarm.stop()

    run()
