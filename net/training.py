"""Training passes through the swarm: forward and backward over a chain of servers, with retries.

`SwarmBlocks.forward` runs blocks [0, n) hop by hop and remembers each hop's input; `backward` walks the
hops in reverse with those inputs. A hop that fails is banned and its blocks are rerouted over other
servers: a failed forward resumes from the hop's kept input; a failed backward first recomputes the new
hops' inputs from it (a forward through the replacement), then runs their backward. Servers keep no
state between the two passes, so nothing else needs replaying.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import trio

from mesh.balancing.routing import Hop, NoRoute, min_latency_chain

from mesh.net import wire
from mesh.net.client import remote_backward, remote_forward
from mesh.net.inference import BanList, RouteUnavailable, candidates
from mesh.net.latency import RttTracker
from mesh.net.node import Node, PeerUnavailable, short_id
from mesh.net.swarm import SwarmTable

log = logging.getLogger("mesh.training")

RETRIABLE = (PeerUnavailable, wire.FrameTimeout, wire.StreamClosed, wire.Unavailable, wire.Busy, trio.TooSlowError)
MAX_RETRIES = 5


@dataclass
class Pass:
    """What a forward pass leaves for its backward: each hop and the input it received."""

    hops: list[Hop]
    inputs: list[torch.Tensor]
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None


class SwarmBlocks:
    def __init__(self, node: Node, table: SwarmTable, rtt: RttTracker, bans: BanList, model_id: str,
                 num_blocks: int, compression: str = "none", timeout: float = 120.0) -> None:
        self.node, self.table, self.rtt, self.bans = node, table, rtt, bans
        self.model_id, self.num_blocks = model_id, num_blocks
        self.compression, self.timeout = compression, timeout
        self.retries = 0

    async def _route(self, start: int, end: int) -> list[Hop]:
        servers = self.table.servers(self.model_id)
        await self.rtt.measure([s.peer_id for s in servers], only_missing=True)
        try:
            return min_latency_chain(candidates(servers), start, end, self.rtt.rtt, banned=self.bans.banned())
        except NoRoute as e:
            raise RouteUnavailable(f"no server holds block {e.block} of {self.model_id}") from e

    def _info(self, peer_id: str):
        info = self.table.get(peer_id)
        if info is None:
            raise PeerUnavailable(f"server {short_id(peer_id)} left the swarm")
        return info

    async def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, Pass]:
        end = self.num_blocks if end is None else end
        hops, inputs = [], []
        pos, x = start, hidden
        failures = 0
        while pos < end:
            route = await self._route(pos, end)
            try:
                for hop in route:
                    y = await remote_forward(self.node, self._info(hop.peer_id), hop.start, hop.end, x, position_ids,
                                             attention_mask, compression=self.compression, timeout=self.timeout)
                    hops.append(hop)
                    inputs.append(x)
                    x, pos = y, hop.end
            except RETRIABLE as e:
                failures = self._failed(hop, e, failures)
        return x, Pass(hops, inputs, position_ids, attention_mask)

    async def backward(self, grad_output: torch.Tensor, done: Pass) -> torch.Tensor:
        grad = grad_output
        for hop, x in zip(reversed(done.hops), reversed(done.inputs)):
            grad = await self._backward_hop(hop, x, grad, done)
        return grad

    async def _backward_hop(self, hop: Hop, x: torch.Tensor, grad: torch.Tensor, done: Pass) -> torch.Tensor:
        failures = 0
        while True:
            try:
                g, _ = await remote_backward(self.node, self._info(hop.peer_id), hop.start, hop.end, x, grad,
                                             done.position_ids, done.attention_mask,
                                             compression=self.compression, timeout=self.timeout)
                return g
            except RETRIABLE as e:
                failures = self._failed(hop, e, failures)
            # Reroute this hop's blocks: recompute the replacement's inputs from the kept input, then go back.
            try:
                _, sub = await self.forward(x, done.position_ids, done.attention_mask, hop.start, hop.end)
                return await self.backward(grad, sub)
            except RETRIABLE as e:
                failures = self._failed(hop, e, failures)

    def _failed(self, hop: Hop, e: BaseException, failures: int) -> int:
        failures += 1
        self.retries += 1
        log.warning("blocks %d:%d on %s failed (%s); rerouting", hop.start, hop.end, short_id(hop.peer_id), e)
        self.bans.ban(hop.peer_id)
        if failures > MAX_RETRIES:
            raise RouteUnavailable(f"blocks {hop.start}:{hop.end} failed {failures} times: {e}")
        return failures


