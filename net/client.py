"""Calls from a client (or a server) to a remote span: sessions, forward, backward, info, ping.

Every call has a deadline and raises a typed error: `PeerUnavailable` (cannot reach or the stream broke),
`wire.FrameTimeout`, `wire.Busy`, `MaxLengthExceeded`, `BadRequest`, `wire.UnknownVersion`. Routing and
failover build on these in the session layer above.
"""

from __future__ import annotations

import secrets
import statistics
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import torch
import trio

from mesh.net import wire
from mesh.net.messages import (BackwardReply, BackwardRequest, CloseSession, ForwardReply, ForwardRequest,
                               InfoReply, InfoRequest, OpenSession, Ping, Pong, Relink, SessionOpened, Step,
                               StepResult)
from mesh.net.node import Node, PeerUnavailable
from mesh.net.swarm import ServerInfo

STEP_TIMEOUT = 60.0


class RemoteSession:
    """An open inference session on one server for blocks [start, end), on one long-lived stream."""

    def __init__(self, node: Node, server: ServerInfo, stream, opened: OpenSession) -> None:
        self.node = node
        self.server = server
        self.stream = stream
        self.opened = opened
        self.position = 0  # tokens the server's cache holds for us
        self._step_ids = 0

    @property
    def session_id(self) -> str:
        return self.opened.session_id

    @property
    def peer_id(self) -> str:
        return self.server.peer_id

    async def step(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, *, position: int | None = None,
                   prompts: torch.Tensor | None = None, timeout: float = STEP_TIMEOUT) -> torch.Tensor:
        """Send new tokens' hidden states; `position` (default: what we sent so far) is the expected cache length."""
        position = self.position if position is None else position
        self._step_ids += 1
        msg = Step(self._step_ids, position, hidden, position_ids, attention_mask, prompts)
        try:
            await wire.write_frame(self.stream, msg.to_wire(self.opened.compression), timeout=timeout)
            frame = await wire.read_frame(self.stream, timeout=timeout)
        except wire.StreamClosed as e:
            raise PeerUnavailable(f"server {self.peer_id[-8:]} dropped the session", hint="reroute") from e
        result = StepResult.from_wire(wire.raise_if_error(frame))
        self.position = position + hidden.shape[1]
        return result.hidden

    async def relink(self, next_hop: dict | None) -> None:
        await wire.write_frame(self.stream, Relink(next_hop).to_wire())

    async def close(self) -> None:
        with trio.move_on_after(2.0):
            try:
                await wire.write_frame(self.stream, CloseSession().to_wire(), timeout=2.0)
            except wire.WireError:
                pass


@asynccontextmanager
async def open_session(node: Node, server: ServerInfo, start: int, end: int, max_length: int,
                       batch_size: int = 1, *, compression: str = "none", next_hop: dict | None = None,
                       timeout: float = 30.0) -> AsyncIterator[RemoteSession]:
    node.remember(server.peer_id, server.addrs)
    opened = OpenSession(secrets.token_hex(8), start, end, max_length, batch_size, compression, next_hop)
    async with node.stream(server.peer_id, "inference", timeout=timeout) as stream:
        await wire.write_frame(stream, opened.to_wire(), timeout=timeout)
        try:
            SessionOpened.from_wire(wire.raise_if_error(await wire.read_frame(stream, timeout=timeout)))
        except wire.StreamClosed as e:
            raise PeerUnavailable(f"server {server.peer_id[-8:]} closed the session at open") from e
        session = RemoteSession(node, server, stream, opened)
        try:
            yield session
        finally:
            with trio.CancelScope(shield=True):
                await session.close()


async def remote_forward(node: Node, server: ServerInfo, start: int, end: int, hidden: torch.Tensor,
                         position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                         prompts: torch.Tensor | None = None, compression: str = "none",
                         timeout: float = STEP_TIMEOUT) -> torch.Tensor:
    node.remember(server.peer_id, server.addrs)
    req = ForwardRequest(start, end, hidden, position_ids, attention_mask, prompts, compression)
    reply = await _call(node, server.peer_id, "forward", req, compression, timeout, ForwardReply)
    return reply.hidden


async def remote_backward(node: Node, server: ServerInfo, start: int, end: int, hidden: torch.Tensor,
                          grad_output: torch.Tensor, position_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, *, prompts: torch.Tensor | None = None,
                          compression: str = "none", timeout: float = STEP_TIMEOUT
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    node.remember(server.peer_id, server.addrs)
    req = BackwardRequest(start, end, hidden, grad_output, position_ids, attention_mask, prompts, compression)
    reply = await _call(node, server.peer_id, "backward", req, compression, timeout, BackwardReply)
    return reply.grad_input, reply.grad_prompts


async def server_info(node: Node, peer_id: str, timeout: float = 10.0) -> InfoReply:
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


async def _call(node: Node, peer_id: str, name: str, req, compression: str, timeout: float, reply_type):
    try:
        return await node.request(peer_id, name, req, timeout=timeout, compression=compression, reply=reply_type)
    except wire.StreamClosed as e:
        raise PeerUnavailable(f"{peer_id[-8:]} closed the {name} stream", hint="reroute") from e
    except trio.TooSlowError as e:
        raise wire.FrameTimeout(f"{name} on {peer_id[-8:]} took longer than {timeout:.0f} s") from e
