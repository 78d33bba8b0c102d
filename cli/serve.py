"""`mesh serve`: host a span of a model's blocks for the swarm."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import typer

from .common import device_option, dtype_option, initial_peers_option, node_config, swarm_key_option
from .output import one_line_errors, setup_logging, write
from ..net import defaults

__all__ = ["serve"]


@one_line_errors
def serve(
    model: str = typer.Argument("smollm2", help="Model to serve: name, hub id, folder or .gguf."),
    blocks: str = typer.Option(defaults.BLOCKS, help="START:END to host blocks [START, END), or auto: as many as "
                               "--max-memory holds, where the swarm is weakest, moving when balance needs it."),
    initial_peers: list[str] = initial_peers_option(),
    swarm_key: Path = swarm_key_option(),
    allow_peers: Path = typer.Option(None, "--allow-peers", help="File of peer ids (one per line, # comments): "
                                     "serve, relay and gossip with these peers only; others get a typed refusal "
                                     "and their connection is closed."),
    listen: list[str] = typer.Option(None, help="Multiaddrs to listen on (default /ip4/0.0.0.0/tcp/31337, or the "
                                                  "next free port when another process holds it)."),
    identity: Path = typer.Option(None, help="Key file of this node's identity (default ~/.config/mesh/identity.key; "
                                               "while another server here uses it, identity-2.key, …)."),
    new_identity: bool = typer.Option(False, "--new-identity", help="Use a fresh identity for this run only."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    quant: str = typer.Option(defaults.QUANT, help="Quantize the span's linear layers: none, int8 (LLM.int8) or nf4 "
                              "(bitsandbytes; MPS has nf4 only); auto: nf4 on CUDA when the blocks would not fit "
                              "unquantized, else none."),
    max_memory: float = typer.Option(None, "--max-memory", "--memory",
                                     help="With --blocks auto: GB for the blocks (at --quant) and their attention "
                                          "cache (default: half of the device's free memory)."),
    balance_period: float = typer.Option(defaults.BALANCE_PERIOD, min=0.0,
                                         help="With --blocks auto: mean seconds between checks whether moving "
                                              "would help the swarm (0: never move)."),
    join_delay: float = typer.Option(defaults.JOIN_DELAY, min=0.0,
                                     help="With --blocks auto: mean random wait before choosing blocks, so "
                                          "servers starting together spread out."),
    bandwidth: float = typer.Option(None, min=0.1, help="This host's link in Mbit/s, for the announced "
                                                       "throughput (default: probed against a connected "
                                                       "server, else 100 assumed)."),
    adapter: list[Path] = typer.Option(None, help="LoRA adapter folder (peft format) to host; clients use it "
                                                  "by the folder's name (`mesh chat --adapter NAME`). Repeatable."),
    remeasure: bool = typer.Option(False, "--remeasure", help="Measure compute throughput again instead of "
                                                             "using the cached figure."),
    cache_tokens: int = typer.Option(defaults.CACHE_TOKENS, min=1,
                                     help="Attention-cache budget: sum of max_length × batch over sessions."),
    max_length: int = typer.Option(defaults.MAX_LENGTH, min=1, help="Longest session a client may open."),
    public_name: str = typer.Option("", help="Name shown in `mesh status`."),
    announce_period: float = typer.Option(defaults.ANNOUNCE_PERIOD, min=0.2, help="Seconds between announcements."),
    idle_timeout: float = typer.Option(defaults.IDLE_TIMEOUT, min=1.0, help="Close sessions silent for this long."),
    threads: int = typer.Option(0, min=0, help="CPU threads for compute (0 = torch's default: all cores). "
                                             "Servers sharing a machine should split its cores."),
    limit: list[str] = typer.Option(None, "--limit", help="NAME=VALUE: what one peer may take of this server, "
                                    "e.g. sessions_per_peer=8 (repeatable; names and defaults in docs/security.md)."),
    verbose: int = typer.Option(1, "--verbose", "-v", count=True, help="-v: what the node does; -vv: details."),
) -> None:
    """Host blocks of MODEL, announce them, and answer inference and training calls until stopped.

    Ctrl-C or SIGTERM drains: open sessions get a moment to finish, the swarm is told OFFLINE, then the
    node exits. A second Ctrl-C stops at once.
    """
    import trio

    from ..model.device import Device
    from ..model.quant import check_quant
    from ..net.allowlist import read_allow_list
    from ..net.quotas import parse_limits
    from ..net.server import ServerConfig, run_server

    setup_logging(verbose)
    if threads:
        import torch

        torch.set_num_threads(threads)
    where = Device.choose(device, dtype)
    config = ServerConfig(model=model, blocks=blocks,
                          node=node_config(initial_peers, listen, identity, ephemeral=new_identity,
                                           swarm_key=swarm_key,
                                           allow_peers=read_allow_list(allow_peers) if allow_peers else None),
                          device=where, quant=check_quant(quant, where.torch), max_memory_gb=max_memory,
                          balance_period=balance_period, join_delay=join_delay, bandwidth_mbps=bandwidth,
                          remeasure=remeasure, adapters=list(adapter or []),
                          cache_tokens=cache_tokens, max_length=max_length,
                          public_name=public_name, announce_period=announce_period, idle_timeout=idle_timeout,
                          quotas=parse_limits(list(limit or [])))

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as outer:
            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        if stop.is_set():  # a second signal: stop without draining
                            outer.cancel_scope.cancel()
                        stop.set()

            outer.start_soon(on_signals)
            async with trio.open_nursery() as inner:
                server = await inner.start(lambda task_status: run_server(config, stop=stop, task_status=task_status))
                for addr in server.node.join_addrs():
                    write(f"mesh: listening on {addr}\n")
                write(f"mesh: serving blocks {server.blocks[0]}:{server.blocks[1]} of {server.source.model_id} "
                      f"({server.source.num_blocks} blocks)\n")
            outer.cancel_scope.cancel()
        logging.getLogger("mesh.server").info("stopped")

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
