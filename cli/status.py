"""`mesh status`: the swarm table as one node sees it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import initial_peers_option, node_config, swarm_key_option
from .output import one_line_errors, setup_logging, stderr, write

__all__ = ["status", "block_runs"]


@one_line_errors
def status(
    model: str = typer.Argument(None, help="Model to show (name, folder or model id); default: every model seen."),
    initial_peers: list[str] = initial_peers_option(),
    swarm_key: Path = swarm_key_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts instead of a table."),
    watch: bool = typer.Option(False, "--watch", help="Keep refreshing the table until Ctrl-C."),
    web: bool = typer.Option(False, "--web", help="Serve a live dashboard of the swarm in the browser instead of "
                             "printing (until Ctrl-C)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the dashboard listens on (with --web)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port of the dashboard (with --web); 0: any "
                             "free port."),
    timeout: float = typer.Option(10.0, min=1.0, help="Seconds to wait for peers and their tables."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True),
) -> None:
    """Print the servers of the swarm, their spans and throughput, and block coverage.

    Exits with code 1 when a model is not fully covered (some block has no ONLINE server). With --web it
    prints the dashboard's address and keeps following the swarm until Ctrl-C or SIGTERM.
    """
    import signal

    import trio

    from ..model.errors import MeshError
    from ..net.client import ping  # noqa: F401  (imported before joining: see _collect)
    from ..net.node import open_node
    from ..net.report import swarm_report
    from ..net.swarm import open_swarm

    setup_logging(verbose)
    config = node_config(initial_peers, server=False, swarm_key=swarm_key)
    if not config.initial_peers:
        raise MeshError("no peer to ask", hint="pass --initial-peers MULTIADDR (printed by mesh serve)")
    model_id = _model_id(model) if model else None
    result: dict = {}

    if web:  # imported before joining, like everything the node needs (see _collect)
        from ..web.dashboard import serve_dashboard

    async def main() -> None:
        async with open_node(config) as node, open_swarm(node) as swarm:
            await _collect(swarm, model_id, timeout)
            if web:
                async with trio.open_nursery() as nursery:
                    url = await nursery.start(serve_dashboard, swarm, model_id, host, port)
                    write(f"dashboard: {url}/\n")
                    with trio.open_signal_receiver(signal.SIGTERM) as signals:
                        async for _ in signals:  # SIGTERM ends the watch as Ctrl-C does
                            nursery.cancel_scope.cancel()
                            break
                return
            if not watch:
                result.update(await swarm_report(swarm, model_id))
                return
            from rich.live import Live

            with Live(console=stderr(), refresh_per_second=2) as live:
                while True:
                    report = await swarm_report(swarm, model_id)
                    live.update(_render(report))
                    await trio.sleep(2.0)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        return
    except BaseExceptionGroup as group:  # Ctrl-C inside the node's nurseries arrives wrapped
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        return
    if web:
        return
    if as_json:
        write(json.dumps(result, indent=2) + "\n")
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
        console.print(_render(result))
    if not result["models"] or not all(m["covered"] for m in result["models"]):
        raise typer.Exit(1)


def _model_id(ref: str) -> str:
    from ..model.errors import MeshError
    from ..model.sources import _slug, resolve_model

    try:
        return resolve_model(ref, progress=False).model_id
    except MeshError:
        return _slug(ref.rstrip("/").split("/")[-1])  # a model id as announced, e.g. from another machine


async def _collect(swarm, model_id: str | None, timeout: float) -> None:
    """Snapshots from every connected peer, then the models' gossip.

    Everything this needs is imported before the node starts: a table is soft state that expires a few
    announcement periods after it was heard, and an import that blocks the event loop for seconds (torch,
    transformers on a loaded machine) once left the table to expire before it was printed.
    """
    from ..net.wire import short_id

    if model_id is not None:
        await swarm.discover(model_id, timeout=timeout)
        return
    for peer, why in (await swarm.snapshots_from_connected("", timeout)).items():
        stderr().print(f"mesh status: peer {short_id(peer)} sent no table: {why}", highlight=False, soft_wrap=True)
    for mid in {i.model_id for i in swarm.table.all()}:
        await swarm.follow(mid)


def _render(report: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from ..net.swarm import coverage_summary
    from ..net.wire import short_id

    parts = []
    if not report.get("models"):
        return Text("no servers found", style="yellow")
    for m in report["models"]:
        table = Table(title=f"{m['model_id']} ({m['num_blocks']} blocks)", title_justify="left")
        for col in ("name", "peer", "blocks", "state", "tok/s/block", "sessions", "batch", "free cache", "rtt ms",
                    "device", "dtype", "version", "relayed", "adapters"):
            table.add_column(col)
        for s in m["servers"]:
            rtt = f"{s['rtt'] * 1000:.1f}" if s.get("rtt") is not None else "-"
            state = s["state"] + (" [bold red]CAUGHT LYING[/bold red]" if s.get("caught") else "")
            table.add_row(s["public_name"] or "-", short_id(s["peer_id"]), f"{s['start']}:{s['end']}", state,
                          f"{s['throughput']:.1f}", str(s.get("sessions", 0)),
                          f"{s['batch']:.1f}" if s.get("batch") else "-", str(s["cache_tokens_free"]), rtt,
                          s.get("device", "cpu"),
                          s["dtype"] + (f"/{s['quant']}" if s.get("quant", "none") != "none" else ""), s["version"],
                          "yes" if s["relayed"] else "no", ", ".join(s.get("adapters") or []) or "-")
        style = "green" if m["covered"] else "red"
        line = coverage_summary(m["servers_per_block"]) if m["num_blocks"] else "no blocks known"
        parts += [table, Text(line, style=style)]
        parts += [Text(f"{short_id(s['peer_id'])} was caught lying by your client: {s['caught']}", style="red")
                  for s in m["servers"] if s.get("caught")]
        if m["num_blocks"]:
            runs = block_runs(m["throughput_per_block"])
            parts.append(Text("tokens/s per block: " + "  ".join(f"{a}:{b} {t:.1f}" for a, b, t in runs)))
            low = min(runs, key=lambda r: r[2])
            parts.append(Text(f"bottleneck: blocks {low[0]}:{low[1]} at {low[2]:.1f} tokens/s", style=style))
    return Group(*parts)


def block_runs(values: list[float]) -> list[tuple[int, int, float]]:
    """Stretches of consecutive blocks with the same summed throughput: (start, end, tokens/s)."""
    runs: list[tuple[int, int, float]] = []
    for b, t in enumerate(values):
        if runs and abs(runs[-1][2] - t) <= 1e-6 * max(1.0, t):
            runs[-1] = (runs[-1][0], b + 1, runs[-1][2])
        else:
            runs.append((b, b + 1, t))
    return runs
