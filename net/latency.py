"""Round-trip times to peers as moving averages, measured with our own ping protocol."""

from __future__ import annotations

import logging

import trio

from .client import ping
from .node import Node
from .wire import short_id

__all__ = ["RttTracker"]

log = logging.getLogger("mesh.latency")

ALPHA = 0.3  # weight of a new sample
FAILED_RTT = 10.0  # what an unanswered ping counts as (seconds)


class RttTracker:
    """Round-trip times to peers, smoothed, measured with our own ping protocol."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.rtt: dict[str, float] = {}

    def add(self, peer_id: str, sample: float) -> None:
        old = self.rtt.get(peer_id)
        self.rtt[peer_id] = sample if old is None else (1 - ALPHA) * old + ALPHA * sample

    async def measure(self, peers: list[str], timeout: float = 3.0, only_missing: bool = False) -> dict[str, float]:
        """Ping `peers` concurrently; unanswered ones count as very slow (routing then avoids them)."""
        todo = [p for p in peers if not (only_missing and p in self.rtt)]

        async def one(peer: str) -> None:
            try:
                self.add(peer, await ping(self.node, peer, count=2, timeout=timeout))
            except Exception as e:
                log.debug("ping %s failed: %s", short_id(peer), e)
                self.add(peer, FAILED_RTT)

        async with trio.open_nursery() as n:
            for peer in todo:
                n.start_soon(one, peer)
        return dict(self.rtt)
