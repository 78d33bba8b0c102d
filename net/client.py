"""Calls from a client (or a server) to a remote span: sessions, forward, backward, info, ping.

Every call has a deadline and raises a typed error: `PeerUnavailable` (cannot reach or the stream broke),
`wire.FrameTimeout`, `wire.Busy`, `MaxLengthExceeded`, `BadRequest`, `wire.UnknownVersion`. Routing and
failover build on these in the session layer above.
"""

from __future__ import annotations

import statistics
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import torch
import trio

from ..model.errors import MeshError
from ..model.span import SpanGrads
from . import wire
from .wire import short_id
from .adapters import ClientLora
from .codec import decode_tensor
from .messages import (BackwardReply, BackwardRequest, CloseSession, ForwardReply, ForwardRequest, InfoReply,
                       InfoRequest, NextHop, OpenSession, Ping, Pong, Predecessor, Probe, ProbeReply, Relink,
                       SessionOpened, Step)
from .node import Node, PeerUnavailable
from .announce import ServerInfo

__all__ = ["RemoteSession", "open_session", "remote_forward", "remote_backward", "server_info", "ping",
           "probe_link"]

STEP_TIMEOUT = 60.0
PROBE_BYTES = 1 << 20


class RemoteSession:
    """An open inference session on one server for blocks [start, end), on one long-lived stream."""

    def __init__(self, node: Node, server: ServerInfo, stream, opened: OpenSession, session_id: str) -> None:
        self.node = node
        self.server = server
        self.stream = stream
        self.opened = opened
        self.session_id = session_id  # named by the server

    @property
    def peer_id(self) -> str:
        return self.server.peer_id

    def as_next_hop(self) -> NextHop:
        """This session as the push target of the server before it."""
        return NextHop(self.server.peer_id, self.session_id)

    async def send(self, step: Step, timeout: float = STEP_TIMEOUT) -> None:
        """Send a step; only the chain's last server answers it (see `net/chain.py`)."""
        await wire.write_frame(self.stream, step.to_wire(self.opened.compression), timeout=timeout)

    async def relink(self, next_hop: NextHop | None) -> None:
        await wire.write_frame(self.stream, Relink(next_hop).to_wire())

    async def accept_pushes_from(self, peer_id: str) -> None:
        """Name the server that pushes to this session from now on (the hop before it changed)."""
        await wire.write_frame(self.stream, Predecessor(peer_id).to_wire())

    async def close(self) -> None:
        with trio.move_on_after(2.0):
            try:
                await wire.write_frame(self.stream, CloseSession().to_wire(), timeout=2.0)
            except wire.WireError:
                pass


@asynccontextmanager
async def open_session(node: Node, server: ServerInfo, start: int, end: int, max_length: int,
                       batch_size: int = 1, *, compression: str = "none", next_hop: NextHop | None = None,
                       prev: str = "", lora: ClientLora | None = None,
                       timeout: float = 30.0) -> AsyncIterator[RemoteSession]:
    """An inference session on one server for blocks [start, end), closed on exit; it pushes its outputs to
    `next_hop` and takes pushes only from the peer `prev` (the server before it in the chain)."""
    node.remember(server.peer_id, server.addrs)
    opened = OpenSession(start, end, max_length, batch_size, compression, next_hop,
                         lora=lora.ref(start, end, with_weights=True) if lora is not None else None, prev=prev)
    async with node.stream(server.peer_id, "inference", timeout=timeout) as stream:
        await wire.write_frame(stream, opened.to_wire(), timeout=timeout)
        try:
            reply = SessionOpened.from_wire(wire.raise_if_error(await wire.read_frame(stream, timeout=timeout)))
        except wire.StreamClosed as e:
            raise PeerUnavailable(f"server {short_id(server.peer_id)} closed the session at open") from e
        session = RemoteSession(node, server, stream, opened, reply.session_id)
        try:
            yield session
        finally:
            with trio.CancelScope(shield=True):
                await session.close()


async def remote_forward(node: Node, server: ServerInfo, start: int, end: int, hidden: torch.Tensor,
                         position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                         prompts: torch.Tensor | None = None, lora: ClientLora | None = None,
                         compression: str = "none", keep: str = "", timeout: float = STEP_TIMEOUT) -> torch.Tensor:
    """`keep`: the server keeps this pass's graph for a `remote_backward` with the same `keep`."""
    node.remember(server.peer_id, server.addrs)

    def request(ref: dict | None) -> ForwardRequest:
        return ForwardRequest(start, end, hidden, position_ids, attention_mask, prompts, compression, ref, keep)

    reply = await _call_with_lora(node, server.peer_id, "forward", request, lora, start, end, compression,
                                  timeout, ForwardReply)
    _expect_shape(server.peer_id, "forward", reply.hidden, hidden.shape)
    return reply.hidden


async def remote_backward(node: Node, server: ServerInfo, start: int, end: int, hidden: torch.Tensor,
                          grad_output: torch.Tensor, position_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, *, prompts: torch.Tensor | None = None,
                          lora: ClientLora | None = None, compression: str = "none", keep: str = "",
                          timeout: float = STEP_TIMEOUT) -> SpanGrads:
    """Gradients w.r.t. the hop's input, its deep prompts and its LoRA tensors (those sent)."""
    node.remember(server.peer_id, server.addrs)

    def request(ref: dict | None) -> BackwardRequest:
        return BackwardRequest(start, end, hidden, grad_output, position_ids, attention_mask, prompts,
                               compression, ref, keep)

    reply = await _call_with_lora(node, server.peer_id, "backward", request, lora, start, end, compression,
                                  timeout, BackwardReply)
    _expect_shape(server.peer_id, "backward", reply.grad_input, hidden.shape)
    if prompts is not None and reply.grad_prompts is not None:
        _expect_shape(server.peer_id, "backward", reply.grad_prompts, prompts.shape)
    grad_lora = None
    if reply.grad_lora is not None:
        try:
            grad_lora = [decode_tensor(g, name="BackwardReply.grad_lora") for g in reply.grad_lora]
        except MeshError as e:
            raise PeerUnavailable(f"{short_id(server.peer_id)} sent malformed LoRA gradients: {e}") from e
        want = [t.shape for t in lora.weights.sub(start, end).tensors()] if lora and lora.weights else []
        if [g.shape for g in grad_lora] != want or not all(
                g.is_floating_point() and bool(torch.isfinite(g).all()) for g in grad_lora):
            raise PeerUnavailable(f"{short_id(server.peer_id)} sent LoRA gradients of the wrong shapes or not finite")
    return SpanGrads(reply.grad_input, reply.grad_prompts, grad_lora)


def _expect_shape(peer_id: str, name: str, t: torch.Tensor, shape: torch.Size) -> None:
    """A server's answer must have the shape the request implies: anything else fails that server."""
    if tuple(t.shape) != tuple(shape) or not t.is_floating_point():
        raise PeerUnavailable(f"{short_id(peer_id)} answered a {name} of {list(shape)} with {list(t.shape)}")


async def _call_with_lora(node: Node, peer_id: str, name: str, request, lora: ClientLora | None, start: int,
                          end: int, compression: str, timeout: float, reply_type):
    """Send the adapter's weights the first time this server sees them for these blocks, and again if it
    has forgotten them (`adapter_unknown`)."""
    slot = (peer_id, start, end)
    for attempt in range(2):
        send = lora is not None and lora.weights is not None and slot not in lora.sent
        ref = lora.ref(start, end, send) if lora is not None else None
        try:
            reply = await _call(node, peer_id, name, request(ref), compression, timeout, reply_type)
        except wire.AdapterUnknown:
            if attempt or lora is None:
                raise
            lora.sent.discard(slot)
            continue
        if send:
            lora.sent.add(slot)
        return reply
    raise AssertionError("unreachable")


async def server_info(node: Node, peer_id: str, timeout: float = 10.0) -> InfoReply:
    """A server's announcement as it sees it now, its counters, and its sessions' cache lengths."""
    return await _call(node, peer_id, "info", InfoRequest(), "none", timeout, InfoReply)


async def ping(node: Node, peer_id: str, count: int = 3, timeout: float = 5.0) -> float:
    """Median round-trip time in seconds over one stream (libp2p's own ping rounds to whole ms)."""
    rtts = []
    with trio.fail_after(timeout):
        async with node.stream(peer_id, "ping", timeout=timeout) as s:
            for nonce in range(count):
                t0 = time.perf_counter()
                await wire.write_frame(s, Ping(nonce).to_wire(), timeout=timeout)
                pong = Pong.from_wire(wire.raise_if_error(await wire.read_frame(s, timeout=timeout)))
                if pong.nonce != nonce:
                    raise wire.MalformedFrame("pong does not match the ping")
                rtts.append(time.perf_counter() - t0)
    return statistics.median(rtts)


async def probe_link(node: Node, peer_id: str, nbytes: int = PROBE_BYTES, timeout: float = 20.0) -> float:
    """Bits per second of a round trip of `nbytes` up and `nbytes` back, less one RTT (the link's rate
    as both directions see it; a peer's own link may be the narrower one, so this is a lower bound)."""
    rtt = await ping(node, peer_id, count=2, timeout=timeout)
    t0 = time.perf_counter()
    await node.request(peer_id, "probe", Probe(bytes(nbytes), nbytes), timeout=timeout, reply=ProbeReply)
    elapsed = time.perf_counter() - t0 - rtt
    return 2 * nbytes * 8 / max(elapsed, 1e-6)


async def _call(node: Node, peer_id: str, name: str, req, compression: str, timeout: float, reply_type):
    try:
        return await node.request(peer_id, name, req, timeout=timeout, compression=compression, reply=reply_type)
    except wire.StreamClosed as e:
        raise PeerUnavailable(f"{short_id(peer_id)} closed the {name} stream", hint="reroute") from e
    except trio.TooSlowError as e:
        raise wire.FrameTimeout(f"{name} on {short_id(peer_id)} took longer than {timeout:.0f} s") from e
