"""`mesh keygen`: make the key file of a private swarm."""

from __future__ import annotations

from pathlib import Path

import typer

from .output import one_line_errors, write

__all__ = ["keygen"]


@one_line_errors
def keygen(
    swarm_key: Path = typer.Option(..., "--swarm-key", help="Where to write the new key (never overwritten)."),
) -> None:
    """Write a new private-swarm key to FILE (readable by you only).

    Give the file to every member; each command then takes `--swarm-key FILE` (or $MESH_SWARM_KEY), and
    nodes without that key cannot connect to the swarm at all.
    """
    from ..net.swarmkey import write_swarm_key

    write_swarm_key(swarm_key)
    write(f"mesh: wrote a new swarm key to {swarm_key}; members pass --swarm-key {swarm_key}\n")
