"""How much of a node one peer may take, enforced by py-libp2p's own resource manager (`libp2p.rcmgr`).

The swarm is open: any peer may dial a node many times, reconnect in a loop, or open many streams and
stall on each. A peer must not take more than its share, so that honest peers are still served.

What rcmgr enforces in py-libp2p 0.8.1, and so what `PeerLimits` sets (measured with real hosts):

- established connections per peer, inbound, outbound and in total (`ConnectionLimits`, checked in
  `Swarm.add_conn`): a connection over a limit is closed right after its upgrade. The swarm's own
  `max_connections_per_peer=1` does not hold against a flood: it trims only connections older than its
  grace period, so without rcmgr one peer keeps as many connections as it opens (up to rcmgr's default 8);
- new connections per second per peer (a token bucket, `acquire_connection`);
- streams in total, both directions together (`ResourceLimits.max_streams`, also the size of a swarm-wide
  semaphore): a stream over the limit *waits*, it is not refused, so this bounds the node's work but
  protects nobody: one peer can fill it and every other peer's streams wait too.

What it does not enforce in this version: streams per peer (its per-peer stream scopes exist but nothing
in the swarm or in Yamux consults them; Yamux accepts every inbound stream), memory (`acquire_memory` and
the memory limits are never called), pending (half-open) connections. Inbound streams per peer are
therefore counted by `Node.set_handler` itself (`streams_per_peer`): a stream past the count is reset
before its handler runs. Memory per peer is bounded by frame sizes and quotas (`net/quotas.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from libp2p.rcmgr import ResourceLimits, ResourceManager
from libp2p.rcmgr.connection_limits import new_connection_limits_with_defaults

__all__ = ["PeerLimits", "resource_manager"]


@dataclass(frozen=True)
class PeerLimits:
    """Limits on what peers may hold at once. The defaults fit a mesh server: an honest peer keeps one
    connection (two or three while a relayed one is upgraded to a direct one) and reconnects rarely; a
    server talks to at most a few hundred peers and pushes to a few dozen."""

    connections_per_peer: int = 4  # established, both directions; rcmgr's default is 8
    inbound_connections: int = 256
    outbound_connections: int = 256
    total_connections: int = 512
    connection_rate_per_peer: float = 10.0  # new connections per second, sustained (rcmgr's default)
    connection_burst_per_peer: int = 50  # new connections at once, before the rate applies (rcmgr's default)
    total_streams: int = 4096  # all peers, both directions; over it streams wait (rcmgr's default 10000)
    streams_per_peer: int = 128  # inbound mesh streams of one peer (Node.set_handler); our nodes open at most 128


def resource_manager(limits: PeerLimits) -> ResourceManager:
    """rcmgr's ResourceManager enforcing `limits`, for `new_host(resource_manager=…)`.

    Graceful degradation is off: when the connection cap is hit it lowers the cap (down to half) until
    usage falls under 80%, so a flood would shrink what is left for honest peers."""
    conns = new_connection_limits_with_defaults()  # keeps rcmgr's pending limits (not enforced in 0.8.1)
    conns.max_established_per_peer = limits.connections_per_peer
    conns.max_established_inbound = limits.inbound_connections
    conns.max_established_outbound = limits.outbound_connections
    conns.max_established_total = limits.total_connections
    return ResourceManager(
        limits=ResourceLimits(max_connections=limits.total_connections, max_streams=limits.total_streams),
        connection_limits=conns,
        enable_graceful_degradation=False,
        enable_rate_limiting=True,
        connections_per_peer_per_sec=limits.connection_rate_per_peer,
        burst_connections_per_peer=float(limits.connection_burst_per_peer),
    )
