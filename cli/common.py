"""Options shared by the networked commands."""

from __future__ import annotations

from pathlib import Path

import typer

from ..net.identity import default_identity_path
from ..net.node import DEFAULT_LISTEN, ENV_INITIAL_PEERS, NodeConfig, env_initial_peers
from ..net.swarmkey import ENV_SWARM_KEY, swarm_key_from

__all__ = ["initial_peers_option", "swarm_key_option", "verify_option", "device_option", "dtype_option",
           "speculate_option", "draft_option", "node_config"]

INITIAL_PEERS_HELP = (f"Multiaddrs of peers to join through (…/p2p/<peer id>); also read from ${ENV_INITIAL_PEERS}. "
                      "Without any, a server starts a new swarm.")


def initial_peers_option():
    """The --initial-peers option every networked command takes."""
    return typer.Option(None, "--initial-peers", "--peer", help=INITIAL_PEERS_HELP)


def swarm_key_option():
    """The --swarm-key option every networked command takes."""
    return typer.Option(None, "--swarm-key", help="Key file of a private swarm (`mesh keygen --swarm-key FILE`); "
                        f"also read from ${ENV_SWARM_KEY}. Nodes without the same key cannot connect at all.")


def verify_option():
    """The --verify option of the commands that generate through the swarm."""
    return typer.Option(None, "--verify", min=0.0, max=1.0, help="Fraction of steps re-executed on an independent "
                        "server holding the same blocks (every answer is also checked as a whole when it ends); a "
                        "server caught lying is banned and its tokens generated again. Default: $MESH_VERIFY, else "
                        "0.02 on the open swarm and 0 with --swarm-key.")


def device_option():
    """The --device option of every command that computes."""
    return typer.Option("auto", "--device", help="Where to compute: auto (CUDA, then Apple MPS, then the CPU), cpu, "
                        "cuda, cuda:N or mps. A device this machine lacks is an error, not a fallback.")


def dtype_option():
    """The --dtype option of every command that computes."""
    return typer.Option("auto", "--dtype", help="float32, bfloat16 or float16; auto: bfloat16 on GPUs that have it, "
                        "float16 on other GPUs and on MPS, float32 on CPUs.")


def speculate_option():
    """The --speculate option of the commands that generate."""
    return typer.Option("auto", "--speculate", help="Speculative decoding: off, auto (drafts per pass chosen from "
                        "the acceptance rate and pass times) or a fixed number of drafts per pass (1-8). Greedy "
                        "output is unchanged; sampled output keeps its distribution.")


def draft_option():
    """The --draft option of the commands that generate."""
    return typer.Option(None, "--draft", help="Draft with this small local model of the same tokenizer "
                        "(default: prompt lookup, which needs no model).")


def node_config(initial_peers: list[str] | None, listen: list[str] | None = None, identity: Path | None = None,
                *, server: bool = True, ephemeral: bool = False, swarm_key: Path | None = None,
                allow_peers: frozenset[str] | None = None) -> NodeConfig:
    """A NodeConfig from the command line (a server listens and keeps its identity; a client neither)."""
    peers = list(initial_peers or []) or env_initial_peers()
    default_listen = server and not listen
    if server:
        listen = list(listen or DEFAULT_LISTEN)
        identity_path = None if ephemeral else (identity or default_identity_path())
    else:
        listen = list(listen or [])
        identity_path = identity
    return NodeConfig(listen=listen, initial_peers=peers, identity_path=identity_path,
                      identity_fallback=server and identity is None, listen_fallback=default_listen,
                      dht_mode="server" if server else "client", relay_service=server,
                      swarm_key=swarm_key_from(swarm_key), allow_peers=allow_peers)
