"""Choosing a chain of servers that covers every block.

Inference: the chain with the least expected time per token. A token pays, per hop of the chain, the
server's compute for its part of the span (blocks / per-block throughput) and the one-way network delay
into it (half an RTT: client → first server, server → next server, last server → client, because outputs
are pushed server to server). Chains may switch servers at any block where spans overlap, never to the
same server twice in a row. It is a shortest path over states (block, server) solved with Dijkstra.

A relayed server (behind a NAT, reached through a relay) costs an extra link each way. Measured RTTs
already include it; where nothing was measured yet, the default RTT is doubled for each relayed end.
"""

from __future__ import annotations

import heapq
import random
import itertools
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["Candidate", "Hop", "NoRoute", "link_rtt", "client_link_rtt", "hop_cost", "min_latency_chain",
           "chain_time", "spread_chain"]

DEFAULT_RTT = 0.05  # seconds, for links nobody measured yet


@dataclass(frozen=True)
class Candidate:
    """What routing needs to know of a server (a projection of its announcement)."""

    peer_id: str
    start: int
    end: int
    throughput: float  # tokens/s per block in decoding
    next_pings: Mapping[str, float] = field(default_factory=dict)  # RTT to other servers, seconds
    relayed: bool = False  # reached through a relay: one more link on every path to it


@dataclass(frozen=True)
class Hop:
    """One hop of a chain: a server and the blocks [start, end) it computes."""

    peer_id: str
    start: int
    end: int


class NoRoute(Exception):
    """No chain covers the blocks; names the first uncovered block."""

    def __init__(self, block: int) -> None:
        super().__init__(f"no server holds block {block}")
        self.block = block


def link_rtt(a: Candidate, b: Candidate, default: float = DEFAULT_RTT) -> float:
    """RTT between two servers as they announce it (either side), else a default."""
    if b.peer_id in a.next_pings:
        return a.next_pings[b.peer_id]
    if a.peer_id in b.next_pings:
        return b.next_pings[a.peer_id]
    return default * (1 + a.relayed + b.relayed)


def client_link_rtt(client_rtt: Mapping[str, float], s: Candidate, default: float = DEFAULT_RTT) -> float:
    """RTT between the client and a server as the client measured it, else a default."""
    return client_rtt.get(s.peer_id, default * (1 + s.relayed))


def hop_cost(prev: Candidate | None, s: Candidate, a: int, b: int, last: bool, client_rtt: Mapping[str, float],
             default_rtt: float = DEFAULT_RTT) -> float:
    """Seconds a token spends on the hop to server `s` for blocks [a, b): half the RTT into it (from
    `prev`, or from the client when None), its compute, and, for the `last` hop, half the RTT back."""
    into = client_link_rtt(client_rtt, s, default_rtt) if prev is None else link_rtt(prev, s, default_rtt)
    cost = into / 2 + (b - a) / max(s.throughput, 1e-9)
    return cost + client_link_rtt(client_rtt, s, default_rtt) / 2 if last else cost


def min_latency_chain(servers: Sequence[Candidate], start: int, end: int,
                      client_rtt: Mapping[str, float] | None = None, default_rtt: float = DEFAULT_RTT,
                      banned: frozenset[str] = frozenset()) -> list[Hop]:
    """The fastest chain covering blocks [start, end); raises NoRoute naming the first uncovered block."""
    client_rtt = client_rtt or {}
    usable = [s for s in servers if s.peer_id not in banned and s.start < end and s.end > start]

    # state: (position, index of the server that covered the blocks just before it; -1 = client)
    best: dict[tuple[int, int], float] = {(start, -1): 0.0}
    parent: dict[tuple[int, int], tuple[tuple[int, int], int, int] | None] = {(start, -1): None}
    tie = itertools.count()
    heap = [(0.0, next(tie), start, -1)]
    done: tuple[int, int] | None = None
    while heap:
        cost, _, pos, last = heapq.heappop(heap)
        if cost > best.get((pos, last), float("inf")):
            continue
        if pos == end:
            done = (pos, last)
            break
        for i, s in enumerate(usable):
            if i == last or not s.start <= pos < s.end:
                continue
            prev = usable[last] if last >= 0 else None
            for b in _exits(usable, pos, min(s.end, end)):
                new = cost + hop_cost(prev, s, pos, b, b == end, client_rtt, default_rtt)
                key = (b, i)
                if new < best.get(key, float("inf")):
                    best[key] = new
                    parent[key] = ((pos, last), pos, b)
                    heapq.heappush(heap, (new, next(tie), b, i))
    if done is None:
        raise NoRoute(_first_gap(usable, start, end))
    hops = []
    key = done
    while parent[key] is not None:
        prev, a, b = parent[key]
        hops.append(Hop(usable[key[1]].peer_id, a, b))
        key = prev
    return hops[::-1]


def _exits(servers: Sequence[Candidate], pos: int, stop: int) -> list[int]:
    """Blocks where a hop may end. Time is linear in the blocks given to each server, so the best switch
    points sit at span boundaries or one block off them (a hop cannot be empty): checking those is exact
    for chains whose middle servers serve more than one block, and far cheaper than every block."""
    if stop - pos <= 16:
        return list(range(pos + 1, stop + 1))
    out = {stop}
    for o in servers:
        for b in (o.start - 1, o.start, o.start + 1, o.end - 1, o.end, o.end + 1):
            if pos < b < stop:
                out.add(b)
    return sorted(out)


def chain_time(chain: Sequence[Hop], servers: Mapping[str, Candidate], client_rtt: Mapping[str, float],
               default_rtt: float = DEFAULT_RTT) -> float:
    """Expected seconds per token of a given chain: the sum of `hop_cost`, which `min_latency_chain`
    minimises (tests check the search against every chain, priced by this)."""
    return sum(hop_cost(servers[chain[i - 1].peer_id] if i else None, servers[hop.peer_id], hop.start, hop.end,
                        i == len(chain) - 1, client_rtt, default_rtt) for i, hop in enumerate(chain))


def _first_gap(servers: Sequence[Candidate], start: int, end: int) -> int:
    reach = start
    for s in sorted(servers, key=lambda s: s.start):
        if s.start > reach:
            break
        reach = max(reach, s.end)
    return reach if reach < end else start


def spread_chain(servers: Sequence[Candidate], start: int, end: int, rng: random.Random,
                 banned: frozenset[str] = frozenset()) -> list[Hop]:
    """A chain for training, where load matters more than latency: at each position, a server holding it,
    drawn with probability proportional to its throughput, serves as far as its span goes."""
    usable = [s for s in servers if s.peer_id not in banned and s.start < end and s.end > start]
    hops: list[Hop] = []
    pos = start
    while pos < end:
        here = [s for s in usable if s.start <= pos < s.end]
        if not here:
            raise NoRoute(pos)
        s = rng.choices(here, weights=[max(c.throughput, 1e-9) for c in here])[0]
        hops.append(Hop(s.peer_id, pos, min(s.end, end)))
        pos = hops[-1].end
    return hops
