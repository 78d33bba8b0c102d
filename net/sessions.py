"""Server side of an inference session: its cache, its inbox, and the push link to the next server.

Steps reach a session from two places: its client's stream and the push stream of the previous server.
Both feed one inbox, so steps are processed one at a time in arrival order; the position each step
carries makes them idempotent (a cache that is ahead is rolled back), which is what makes replays after
a failover safe. After computing, the output is pushed to the next server first (the critical path),
and kept here: the next server's input history, which the client fetches to rebuild a replacement's cache
after a failure. Only the last server of the chain answers the client on every step.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Awaitable, Callable

import torch
import trio

from mesh.model.errors import BadRequest, MeshError
from mesh.model.span import Span, SpanCache
from mesh.net import wire
from mesh.net.messages import (CloseSession, History, HistoryRequest, Message, OpenSession, Relink, Step,
                               StepResult)
from mesh.net.node import Node, PeerUnavailable, short_id
from mesh.net.relay import is_relayed

if TYPE_CHECKING:
    from mesh.net.server import Counters

log = logging.getLogger("mesh.session")

INBOX = 64
StepFn = Callable[[Span, SpanCache, Step], Awaitable[torch.Tensor]]


class ServerSession:
    def __init__(self, node: Node, opened: OpenSession, span: Span, client_stream, step_fn: StepFn,
                 counters: "Counters", idle_timeout: float, max_numel: int) -> None:
        self.node = node
        self.opened = opened
        self.span = span
        self.cache = span.new_cache(opened.batch_size, opened.max_length)
        self.client_stream = client_stream
        self.step_fn = step_fn
        self.counters = counters
        self.idle_timeout = idle_timeout
        self.max_numel = max_numel
        self.next: dict | None = opened.next
        self.inbox_send, self.inbox_recv = trio.open_memory_channel[tuple[str, Step]](INBOX)
        self._client_lock = trio.Lock()
        self._push_stack: AsyncExitStack | None = None
        self._push_stream = None
        self._push_relayed = False  # whether the push stream's connection goes through a relay
        self._cancel = trio.CancelScope()
        self.outputs: list[Step] = []  # pushed outputs, in position order

    @property
    def id(self) -> str:
        return self.opened.session_id

    def cancel(self) -> None:
        self._cancel.cancel()

    async def run(self) -> None:
        with self._cancel:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_client, nursery.cancel_scope)
                    await self._process()
                    nursery.cancel_scope.cancel()
            finally:
                await self._close_push()

    async def deliver_push(self, step: Step) -> None:
        await self.inbox_send.send(("push", step))

    async def _read_client(self, done: trio.CancelScope) -> None:
        while True:
            try:
                frame = await wire.read_frame(self.client_stream, timeout=self.idle_timeout)
                msg = Message.from_wire(wire.raise_if_error(frame), max_numel=self.max_numel)
            except (wire.StreamClosed, wire.FrameTimeout):
                done.cancel()
                return
            except MeshError as e:
                await self._send_client(wire.error_frame(e))
                continue
            if isinstance(msg, CloseSession):
                done.cancel()
                return
            if isinstance(msg, HistoryRequest):
                await self._send_client(self.history(msg.before).to_wire(self.opened.compression))
                continue
            if isinstance(msg, Relink):
                await self._close_push()
                self.next = msg.next
                log.info("session %s relinked to %s", self.id[:8], short_id(msg.next["peer_id"]) if msg.next else "-")
                continue
            if not isinstance(msg, Step):
                await self._send_client(wire.error_frame(BadRequest(f"unexpected {msg.TYPE} in a session")))
                continue
            await self.inbox_send.send(("client", msg))

    async def _process(self) -> None:
        while True:
            source, step = "", None
            with trio.move_on_after(self.idle_timeout):
                source, step = await self.inbox_recv.receive()
            if step is None:
                log.info("session %s idle for %.0f s: closing", self.id[:8], self.idle_timeout)
                return
            try:
                out = await self.step_fn(self.span, self.cache, step)
            except MeshError as e:  # a bad step is answered; the session stays usable
                self.counters.errors += 1
                log.info("session %s: %s", self.id[:8], e.one_line())
                await self._send_client(wire.error_frame(e, step_id=step.step_id))
                continue
            if source == "push":
                self.counters.steps_from_pushes += 1
            else:
                self.counters.steps_from_clients += 1
                self.counters.tokens_from_clients += step.hidden.shape[1]
            if self.next is not None:
                await self._push(step, out)
            self._keep(step, out)
            if self.next is not None:
                continue
            if not step.want_output:
                out = out[:, :0]
            await self._send_client(StepResult(step.step_id, step.position, out).to_wire(self.opened.compression))

    def _keep(self, step: Step, out: torch.Tensor) -> None:
        """Keep what we pushed: the next server's inputs, to rebuild a replacement's cache after a failure."""
        trim_steps(self.outputs, step.position)  # a re-sent step replaces what followed it
        self.outputs.append(Step(step.step_id, step.position, out, step.position_ids, step.attention_mask))

    def history(self, before: int) -> History:
        return concat_steps(self.outputs, before, self.opened.batch_size, self.span.hidden_size)

    async def _push(self, step: Step, out: torch.Tensor) -> None:
        nxt = self.next
        pushed = Step(step.step_id, step.position, out, step.position_ids, step.attention_mask, None,
                      session_id=nxt["session_id"], want_output=step.want_output)
        try:
            if self._push_stream is None:
                await self._open_push(nxt)
            await wire.write_frame(self._push_stream, pushed.to_wire(self.opened.compression))
            self.counters.pushes_sent += 1
            self.counters.pushes_relayed += self._push_relayed
        except (MeshError, trio.TooSlowError) as e:
            await self._close_push()
            failed = PeerUnavailable(f"push to {short_id(nxt['peer_id'])} failed: {e}".splitlines()[0])
            await self._send_client(wire.error_frame(failed, step_id=step.step_id, peer_id=nxt["peer_id"]))

    async def _open_push(self, nxt: dict) -> None:
        self.node.remember(nxt["peer_id"], list(nxt.get("addrs") or []))
        stack = AsyncExitStack()
        self._push_stream = await stack.enter_async_context(self.node.stream(nxt["peer_id"], "push", timeout=10))
        self._push_stack = stack
        self._push_relayed = is_relayed(self._push_stream.muxed_conn)
        # The next server answers on the push stream only when it cannot take a step (e.g. unknown session).
        self.node.nursery.start_soon(self._read_push_errors, self._push_stream, nxt["peer_id"])

    async def _read_push_errors(self, stream, peer_id: str) -> None:
        while True:
            try:
                frame = await wire.read_frame(stream, timeout=self.idle_timeout + 60)
            except wire.WireError:
                return
            if isinstance(frame, dict) and "error" in frame:
                frame["error"].setdefault("peer_id", peer_id)
                await self._send_client(frame)

    async def _close_push(self) -> None:
        stack, self._push_stack, self._push_stream = self._push_stack, None, None
        if stack is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stack.aclose()

    async def _send_client(self, frame: dict) -> None:
        async with self._client_lock:  # results and relayed errors may be written concurrently
            try:
                await wire.write_frame(self.client_stream, frame, timeout=30)
            except wire.WireError:
                self._cancel.cancel()


def concat_steps(steps: list[Step], before: int, batch: int, hidden_size: int) -> History:
    """Steps covering positions [0, before) joined into one History (a straddling step is cut)."""
    hs, ps, ms = [], [], []
    for step in steps:
        if step.position >= before:
            break
        n = min(step.hidden.shape[1], before - step.position)
        hs.append(step.hidden[:, :n])
        ps.append(step.position_ids[:, :n])
        mask = step.attention_mask if step.attention_mask is not None else torch.ones_like(step.position_ids)
        ms.append(mask[:, :n].to(torch.long))
    if not hs:
        return History(torch.zeros(batch, 0, hidden_size), torch.zeros(batch, 0, dtype=torch.long),
                       torch.zeros(batch, 0, dtype=torch.long))
    return History(torch.cat(hs, 1), torch.cat(ps, 1), torch.cat(ms, 1))


def trim_steps(steps: list[Step], position: int) -> None:
    """Drop what a step at `position` replaces: everything at or after it, cutting a straddling step."""
    while steps and steps[-1].position >= position:
        steps.pop()
    if steps and steps[-1].position + steps[-1].hidden.shape[1] > position:
        last = steps[-1]
        n = position - last.position
        mask = last.attention_mask[:, :n] if last.attention_mask is not None else None
        steps[-1] = Step(last.step_id, last.position, last.hidden[:, :n], last.position_ids[:, :n], mask)
