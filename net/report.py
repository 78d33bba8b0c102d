"""The swarm as one node sees it, as plain data: what `mesh status` prints and the dashboard draws.

One builder for both, so the table and the page never disagree about coverage or about who serves what.
"""

from __future__ import annotations

import trio

from .client import ping
from .swarm import Swarm
from .verify import caught_path, read_caught

__all__ = ["swarm_report"]


async def swarm_report(swarm: Swarm, model_id: str | None = None, rtt_timeout: float = 3.0) -> dict:
    """{"models": [...]}: per model its blocks, coverage, per-block throughput and servers (each with
    its announcement, the RTT this node measured, and evidence if this user's clients caught it lying)."""
    servers = swarm.table.all(model_id)
    caught = read_caught(caught_path())
    rtts: dict[str, float | None] = {}

    async def measure(peer: str) -> None:
        try:
            rtts[peer] = await ping(swarm.node, peer, count=2, timeout=rtt_timeout)
        except Exception:
            rtts[peer] = None

    async with trio.open_nursery() as n:
        for info in servers:
            n.start_soon(measure, info.peer_id)
    models = []
    for mid in sorted({i.model_id for i in servers} | ({model_id} if model_id else set())):
        mine = [i for i in servers if i.model_id == mid]
        total = max([i.total_blocks for i in mine] + [i.end for i in mine] + [0])
        counts = swarm.table.coverage(mid, total)
        per_block = swarm.table.block_throughput(mid, total)
        missing = [b for b, c in enumerate(counts) if c == 0]
        models.append({
            "model_id": mid, "num_blocks": total, "covered": total > 0 and not missing, "missing_blocks": missing,
            "servers_per_block": counts, "throughput_per_block": [round(t, 2) for t in per_block],
            "servers": [dict(i.to_wire(), rtt=rtts.get(i.peer_id), caught=caught.get(i.peer_id, {}).get("evidence"))
                        for i in mine],
        })
    return {"models": models}
