"""The `mesh` command line: thin wrappers that parse options and call into mesh's packages."""

from __future__ import annotations

import typer

from mesh.cli.generate import generate
from mesh.cli.serve import serve
from mesh.cli.status import status

app = typer.Typer(help="mesh: run and fine-tune large language models across a swarm of devices.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

app.command()(serve)
app.command()(status)
app.command()(generate)


@app.command()
def version() -> None:
    """Print the mesh version."""
    from mesh import __version__

    typer.echo(__version__)


@app.command()
def demo(
    prompt: str = typer.Option("What is the capital of France? Answer in one sentence.", "--prompt", "-p"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n", min=1),
) -> None:
    """Answer a chat prompt with the embedded default model (SmolLM2-135M-Instruct)."""
    generate(model="smollm2", prompt=prompt, local=True, max_new_tokens=max_new_tokens, temperature=0.0,
             top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0, chat=True, spans=3, dtype="float32")
