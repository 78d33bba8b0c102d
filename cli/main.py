"""The `mesh` command line."""

import typer

app = typer.Typer(help="mesh: run and fine-tune large language models across a swarm of devices.",
                  no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the mesh version."""
    from mesh import __version__
    typer.echo(__version__)
