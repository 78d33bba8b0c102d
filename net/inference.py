"""Client side of routed inference: a chain of server sessions with server-to-server push.

The client opens one session per hop of the chain, last hop first so that each server can be told the
session it pushes to. Per token it sends one `Step` to the first server and waits only for the last
server's `StepResult`; the other servers' results arrive on their own streams off the critical path and
are kept as each next hop's input history (replayed to a replacement server after a failure).
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch
import trio

from mesh.balancing.routing import Candidate, Hop, NoRoute, min_latency_chain
from mesh.model.errors import MeshError
from mesh.net import wire
from mesh.net.client import RemoteSession, open_session
from mesh.net.latency import RttTracker
from mesh.net.messages import Step, StepResult
from mesh.net.node import Node, PeerUnavailable, short_id
from mesh.net.swarm import ServerInfo, SwarmTable

log = logging.getLogger("mesh.inference")

STEP_TIMEOUT = 60.0


class RouteUnavailable(MeshError):
    code = "unavailable"


@dataclass
class HopState:
    hop: Hop
    info: ServerInfo
    session: RemoteSession
    inputs: list[Step] = field(default_factory=list)  # every step this hop received, in order


def candidates(servers: list[ServerInfo]) -> list[Candidate]:
    return [Candidate(s.peer_id, s.start, s.end, s.throughput or 1.0, dict(s.next_pings)) for s in servers]


def plan_route(table: SwarmTable, model_id: str, start: int, end: int, rtts: dict[str, float],
               banned: frozenset[str] = frozenset()) -> list[Hop]:
    servers = table.servers(model_id)
    try:
        return min_latency_chain(candidates(servers), start, end, rtts, banned=banned)
    except NoRoute as e:
        raise RouteUnavailable(f"no server holds block {e.block} of {model_id}",
                               hint="start one with `mesh serve` or wait for the swarm to recover") from e


class InferenceSession:
    """`step()` sends new tokens' hidden states through the chain and returns the last hop's output."""

    def __init__(self, node: Node, hops: list[HopState], compression: str, nursery: trio.Nursery) -> None:
        self.node = node
        self.hops = hops
        self.compression = compression
        self.nursery = nursery
        self._step_ids = 0
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self._sent: dict[int, Step] = {}

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    def describe(self) -> str:
        return " → ".join(f"{short_id(h.hop.peer_id)}[{h.hop.start}:{h.hop.end}]" for h in self.hops)

    async def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position: int, timeout: float = STEP_TIMEOUT) -> torch.Tensor:
        self._step_ids += 1
        step_id = self._step_ids
        msg = Step(step_id, position, hidden, position_ids, attention_mask)
        first = self.hops[0]
        first.inputs.append(msg)
        self._sent[step_id] = msg
        send, receive = trio.open_memory_channel(1)
        self._waiting[step_id] = send
        try:
            await wire.write_frame(first.session.stream, msg.to_wire(self.compression), timeout=timeout)
            with trio.fail_after(timeout):
                outcome = await receive.receive()
        except wire.StreamClosed as e:
            raise PeerUnavailable(f"server {short_id(first.hop.peer_id)} dropped the session") from e
        except trio.TooSlowError as e:
            raise wire.FrameTimeout(f"no result for step {step_id} within {timeout:.0f} s") from e
        finally:
            self._waiting.pop(step_id, None)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _read(self, index: int) -> None:
        """Results and errors from hop `index`: the last hop's output answers a step; others are history."""
        state = self.hops[index]
        last = index == len(self.hops) - 1
        while True:
            try:
                frame = await wire.read_frame(state.session.stream, timeout=3600)
            except wire.WireError as e:
                self._fail_all(PeerUnavailable(f"server {short_id(state.hop.peer_id)} dropped the session: {e}"))
                return
            if isinstance(frame, dict) and "error" in frame:
                try:
                    wire.raise_if_error(frame)
                except MeshError as e:
                    self._fail(frame["error"].get("step_id"), e)
                continue
            try:
                result = StepResult.from_wire(frame)
            except MeshError as e:
                self._fail_all(e)
                continue
            if last:
                waiter = self._waiting.get(result.step_id)
                if waiter is not None:
                    waiter.send_nowait(result.hidden)
            else:  # what hop index+1 received by push: keep it to replay after a failure
                sent = self._sent.get(result.step_id)
                if sent is not None:
                    self.hops[index + 1].inputs.append(
                        Step(result.step_id, result.position, result.hidden, sent.position_ids, sent.attention_mask))

    def _fail(self, step_id: int | None, exc: BaseException) -> None:
        targets = [self._waiting.get(step_id)] if step_id in self._waiting else list(self._waiting.values())
        for waiter in targets:
            if waiter is not None:
                try:
                    waiter.send_nowait(exc)
                except trio.WouldBlock:
                    pass

    def _fail_all(self, exc: BaseException) -> None:
        self._fail(None, exc)


@asynccontextmanager
async def open_inference_session(node: Node, table: SwarmTable, rtt: RttTracker, model_id: str,
                                 num_blocks: int, max_length: int, batch_size: int = 1, *,
                                 compression: str = "none") -> AsyncIterator[InferenceSession]:
    servers = table.servers(model_id)
    await rtt.measure([s.peer_id for s in servers], only_missing=True)
    route = plan_route(table, model_id, 0, num_blocks, rtt.rtt)
    by_id = {s.peer_id: s for s in servers}
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        opened: list[RemoteSession] = []
        next_hop = None
        for hop in reversed(route):  # last first: each server learns the session it pushes to
            info = by_id[hop.peer_id]
            session = await stack.enter_async_context(open_session(
                node, info, hop.start, hop.end, max_length, batch_size, compression=compression,
                next_hop=next_hop))
            opened.append(session)
            next_hop = {"peer_id": info.peer_id, "addrs": info.addrs, "session_id": session.session_id}
        opened.reverse()
        hops = [HopState(hop, by_id[hop.peer_id], s) for hop, s in zip(route, opened)]
        session = InferenceSession(node, hops, compression, nursery)
        for i in range(len(hops)):
            nursery.start_soon(session._read, i)
        log.info("inference session through %s", session.describe())
        try:
            yield session
        finally:
            nursery.cancel_scope.cancel()
