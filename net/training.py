"""Training passes through the swarm: forward and backward over a chain of servers, with retries.

`SwarmBlocks.forward` runs blocks [start, end) hop by hop and remembers each hop's input; `backward`
walks the hops in reverse with those inputs. Deep prompts (one slice per block) and LoRA adapters travel
with each hop's request; their gradients come back with the hop's input gradient and are gathered per
block. A hop that fails is banned and its blocks are rerouted over other servers: a failed forward
resumes from the hop's kept input; a failed backward first recomputes the new hops' inputs from it (a
forward through the replacement), then runs their backward. Servers keep no state between the two
passes, so nothing else needs replaying.

Routing: with `spread=True` (training), each hop is drawn among the servers holding its first block in
proportion to their throughput, so many trainers spread over the swarm; otherwise the fastest chain.
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
from dataclasses import dataclass, field

import torch
import trio

from ..balancing.routing import Hop, min_latency_chain, spread_chain
from ..model.errors import MeshError
from . import wire
from .adapters import ClientLora
from .announce import ServerInfo
from .client import remote_backward, remote_forward
from .chain import ChainConfig, RouteUnavailable, candidates, wait_for_route
from .node import PeerUnavailable
from .wire import short_id

__all__ = ["Pass", "Grads", "SwarmBlocks", "CaughtLying"]

log = logging.getLogger("mesh.training")


class CaughtLying(PeerUnavailable):
    """A spot check found a hop's answer wrong: its blocks are rerouted like a failed hop's."""


RETRIABLE = (PeerUnavailable, wire.FrameTimeout, wire.StreamClosed, wire.Unavailable, wire.Busy, trio.TooSlowError)
MAX_RETRIES = 5


@dataclass
class Pass:
    """What a forward pass leaves for its backward: each hop and the input it received."""

    hops: list[Hop]
    inputs: list[torch.Tensor]
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    prompts: torch.Tensor | None = None  # [num_blocks, 1 or B, P, H], indexed by global block
    lora: ClientLora | None = None
    keeps: list[str] = field(default_factory=list)  # per hop: the id its server kept the graph under


@dataclass
class Grads:
    """Gradients of a backward pass: the input's, and per block those of deep prompts and LoRA tensors."""

    hidden: torch.Tensor | None = None
    prompts: torch.Tensor | None = None  # like Pass.prompts
    lora: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # block -> its LoRA tensors' grads

    def add_hop(self, hop: Hop, prompts: torch.Tensor | None, lora: list[torch.Tensor] | None, per_block: int,
                shape: tuple | None) -> None:
        if prompts is not None:
            if self.prompts is None:
                self.prompts = torch.zeros(shape, dtype=prompts.dtype)
            self.prompts[hop.start:hop.end] += prompts
        if lora is not None:
            for k, b in enumerate(range(hop.start, hop.end)):
                self._add_lora(b, lora[k * per_block:(k + 1) * per_block])

    def merge(self, other: "Grads") -> None:
        """Add the prompt and LoRA gradients of another pass (a rerouted hop's replacement chain)."""
        if other.prompts is not None:
            self.prompts = other.prompts if self.prompts is None else self.prompts + other.prompts
        for b, part in other.lora.items():
            self._add_lora(b, part)

    def _add_lora(self, block: int, part: list[torch.Tensor]) -> None:
        old = self.lora.get(block)
        self.lora[block] = list(part) if old is None else [x + y for x, y in zip(old, part)]


class SwarmBlocks:
    """Blocks through the swarm for training: `forward` and `backward` over a chain, rerouting failures."""

    def __init__(self, cfg: ChainConfig, *, timeout: float = 120.0, spread: bool = False,
                 rng: random.Random | None = None, keep_graphs: bool = False) -> None:
        self.cfg = cfg
        self.node, self.table, self.rtt, self.bans = cfg.node, cfg.table, cfg.rtt, cfg.bans
        self.model_id, self.num_blocks, self.compression = cfg.model_id, cfg.num_blocks, cfg.compression
        self.timeout = timeout
        self.spread = spread
        self.rng = rng or random.Random()
        self.keep_graphs = keep_graphs  # servers keep each forward's graph for its backward (no recompute)
        self.run = secrets.token_hex(6)
        self._keep_ids = itertools.count()
        self.retries = 0
        self._last_known: dict[str, ServerInfo] = {}  # each server's entry when it was last seen

    async def _route(self, start: int, end: int) -> list[Hop]:
        """A chain for blocks [start, end), waiting up to `route_wait` for missing blocks, as inference does."""

        async def attempt() -> list[Hop]:
            servers = [s for s in self.table.servers(self.model_id) if self.cfg.accept(s)]
            self._last_known.update((s.peer_id, s) for s in servers)
            if self.spread:
                return spread_chain(candidates(servers, throughput=True), start, end, self.rng,
                                    banned=self.bans.banned())
            await self.rtt.measure([s.peer_id for s in servers], only_missing=True)
            return min_latency_chain(candidates(servers), start, end, self.rtt.rtt, banned=self.bans.banned())

        return await wait_for_route(attempt, self.cfg, lambda e: f"block {e.block}")

    def _info(self, peer_id: str) -> ServerInfo:
        """The server's entry; one that lapsed (a late announcement on a busy network) is its last known
        entry: a server still up keeps the pass, and one really gone fails to connect, which reroutes."""
        info = self.table.get(peer_id) or self._last_known.get(peer_id)
        if info is None:
            raise PeerUnavailable(f"server {short_id(peer_id)} is not in the swarm")
        self._last_known[peer_id] = info
        return info

    async def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, start: int = 0, end: int | None = None, *,
                      prompts: torch.Tensor | None = None, lora: ClientLora | None = None
                      ) -> tuple[torch.Tensor, Pass]:
        end = self.num_blocks if end is None else end
        hops, inputs, keeps = [], [], []
        pos, x = start, hidden
        failures = 0
        while pos < end:
            route = await self._route(pos, end)
            try:
                for hop in route:
                    keep = f"{self.run}:{next(self._keep_ids)}" if self.keep_graphs else ""
                    log.debug("forward of blocks %d:%d on %s", hop.start, hop.end, short_id(hop.peer_id))
                    y = await remote_forward(self.node, self._info(hop.peer_id), hop.start, hop.end, x, position_ids,
                                             attention_mask, prompts=_slice(prompts, hop), lora=lora,
                                             compression=self.compression, keep=keep, timeout=self.timeout)
                    await self._spot_check(hop, y, attention_mask, lambda s, hop=hop, x=x: remote_forward(
                        self.node, s, hop.start, hop.end, x, position_ids, attention_mask,
                        prompts=_slice(prompts, hop), lora=lora, compression=self.compression, timeout=self.timeout))
                    hops.append(hop)
                    inputs.append(x)
                    keeps.append(keep)
                    x, pos = y, hop.end
            except RETRIABLE as e:
                failures = self._failed(hop, e, failures)
        return x, Pass(hops, inputs, position_ids, attention_mask, prompts, lora, keeps)

    async def backward(self, grad_output: torch.Tensor, done: Pass, into: Grads | None = None) -> Grads:
        grads = into if into is not None else Grads()
        grad = grad_output
        for hop, x, keep in zip(reversed(done.hops), reversed(done.inputs), reversed(done.keeps)):
            grad = await self._backward_hop(hop, x, grad, done, grads, keep)
        grads.hidden = grad
        return grads

    async def _backward_hop(self, hop: Hop, x: torch.Tensor, grad: torch.Tensor, done: Pass,
                            grads: Grads, keep: str = "") -> torch.Tensor:
        failures = 0
        per_block = 2 * len(done.lora.weights.spec.targets) if done.lora and done.lora.weights else 0
        shape = tuple(done.prompts.shape) if done.prompts is not None else None
        while True:
            try:
                log.debug("backward of blocks %d:%d on %s", hop.start, hop.end, short_id(hop.peer_id))
                g = await remote_backward(self.node, self._info(hop.peer_id), hop.start, hop.end, x, grad,
                                          done.position_ids, done.attention_mask, prompts=_slice(done.prompts, hop),
                                          lora=done.lora, compression=self.compression, keep=keep,
                                          timeout=self.timeout)
                await self._spot_check(hop, g.hidden, done.attention_mask,
                                       lambda s: self._grad_input(s, hop, x, grad, done))
                grads.add_hop(hop, g.prompts, g.lora, per_block, shape)
                return g.hidden
            except RETRIABLE as e:
                failures = self._failed(hop, e, failures)
            # Reroute this hop's blocks: recompute the replacement's inputs from the kept input, then go back.
            try:
                _, sub = await self.forward(x, done.position_ids, done.attention_mask, hop.start, hop.end,
                                            prompts=done.prompts, lora=done.lora)
                inner = await self.backward(grad, sub)  # apart: a failure inside must not count twice
                grads.merge(inner)
                return inner.hidden
            except RETRIABLE as e:
                failures = self._failed(hop, e, failures)

    async def _grad_input(self, server, hop: Hop, x: torch.Tensor, grad: torch.Tensor, done: Pass) -> torch.Tensor:
        if server is None:
            raise MeshError("local checks of training passes are not supported")
        g = await remote_backward(self.node, server, hop.start, hop.end, x, grad, done.position_ids,
                                  done.attention_mask, prompts=_slice(done.prompts, hop), lora=done.lora,
                                  compression=self.compression, timeout=self.timeout)
        return g.hidden

    async def _spot_check(self, hop: Hop, claimed: torch.Tensor, mask: torch.Tensor | None, run) -> None:
        """With the checker's rate, re-run a hop's forward or backward elsewhere (net/verify.py); a hop
        found lying raises CaughtLying, which reroutes its blocks like any failure."""
        checker = self.cfg.checker
        if checker is None or not checker.due():
            return
        mask = mask if mask is not None else torch.ones(claimed.shape[:2], dtype=torch.long)
        verdict = await checker.judge_call(self._info(hop.peer_id), hop.start, hop.end, claimed, mask,
                                              self.bans.banned(), run)
        if verdict.first_bad is None:
            return
        if verdict.proven:
            checker.convict(hop.peer_id, verdict.evidence)
        raise CaughtLying(f"{short_id(hop.peer_id)}: {verdict.evidence}")

    def _failed(self, hop: Hop, e: BaseException, failures: int) -> int:
        failures += 1
        self.retries += 1
        log.warning("blocks %d:%d on %s failed (%s); rerouting", hop.start, hop.end, short_id(hop.peer_id), e)
        self.bans.ban(hop.peer_id)
        if failures > MAX_RETRIES:
            raise RouteUnavailable(f"blocks {hop.start}:{hop.end} failed {failures} times: {e}")
        return failures


def _slice(prompts: torch.Tensor | None, hop: Hop) -> torch.Tensor | None:
    return prompts[hop.start:hop.end] if prompts is not None else None
