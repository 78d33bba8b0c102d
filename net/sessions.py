"""Server side of inference sessions: admission, and each session's cache, inbox and push link.

`Sessions` admits a session (its sizes checked, its cache tokens reserved from the server's budget or
`busy` answered, never queued), routes pushed steps to it, computes its steps in the compute lane, and
keeps the counters `mesh status` and the info call report. `ServerSession` is one session.

A session belongs to the peer that opened it. The server names it (an unguessable id the opener passes on
to the server before it in the chain), and takes pushes for it only from the one peer the opener named as
its predecessor (`OpenSession.prev`, changed by `Predecessor` after a failover); its cache tokens, the
count of open sessions and the work waiting in the compute lane are charged to its opener (`net/quotas.py`).

Steps reach a session from two places: its client's stream and the push stream of the previous server.
Both feed one inbox, so steps are processed one at a time in arrival order; the position each step
carries makes them idempotent (a cache that is ahead is rolled back), which is what makes replays after
a failover safe. After computing, the output is pushed to the next server first (the critical path),
and kept here: the next server's input history, which the client fetches to rebuild a replacement's cache
after a failure. Only the last server of the chain answers the client on every step.
"""

from __future__ import annotations

import functools
import logging
import secrets
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Awaitable, Callable

import torch
import trio

from ..model.errors import BadRequest, MeshError
from ..model.lora import LoraWeights
from ..model.batch import Row
from ..model.span import Span, SpanCache
from . import wire
from .codec import check_compression
from .commitments import Commitment, as_received
from .batching import Batcher
from .lane import ComputeLane
from .messages import (CloseSession, History, HistoryRequest, Message, NextHop, OpenSession, Predecessor,
                       Relink, SessionOpened, Step, StepResult)
from .quotas import InFlight, PeerLedger, Quotas
from .node import Node, PeerUnavailable
from .wire import short_id
from .relay import is_relayed
from .steplog import concat_steps, trim_steps

__all__ = ["Sessions", "ServerSession", "SessionCounters", "CacheBudget", "MAX_BATCH"]

log = logging.getLogger("mesh.session")

INBOX = 64
MAX_BATCH = 64
PREDECESSOR_WAIT = 1.0  # s a push from an unexpected peer waits for the opener's `Predecessor` naming it
StepFn = Callable[[Span, SpanCache, Step], Awaitable[torch.Tensor]]


@dataclass
class SessionCounters:
    """What a server's sessions did, for `info` and `mesh status`."""

    sessions_opened: int = 0
    sessions_open: int = 0
    steps_from_clients: int = 0
    tokens_from_clients: int = 0  # positions clients sent in session steps (history is never re-sent)
    steps_from_pushes: int = 0
    pushes_sent: int = 0
    pushes_relayed: int = 0  # of those, sent over a connection through a relay
    errors: int = 0
    busy_refusals: int = 0
    pushes_refused: int = 0  # pushes from a peer that is not the session's predecessor, or to no session


class CacheBudget:
    """Cache tokens shared by the sessions; a request that does not fit is refused, never queued."""

    def __init__(self, tokens: int) -> None:
        self.total = tokens
        self.used = 0

    @property
    def free(self) -> int:
        return self.total - self.used

    def reserve(self, tokens: int) -> None:
        if tokens > self.free:
            raise wire.Busy(f"server busy: {tokens} cache tokens requested, {self.free} of {self.total} free",
                            hint="try another server or a shorter max_length")
        self.used += tokens

    def release(self, tokens: int) -> None:
        self.used -= tokens


class Sessions:
    """A server's open sessions, the cache budget they share, and their counters."""

    def __init__(self, node: Node, lane: ComputeLane, cache_tokens: int, max_length: int, idle_timeout: float,
                 max_numel: int, quotas: Quotas = Quotas(), on_change: Callable[[], None] = lambda: None,
                 frame_bytes: int = wire.MAX_FRAME) -> None:
        self.node, self.lane = node, lane
        self.budget = CacheBudget(cache_tokens)
        self.counters = SessionCounters()
        self.max_length, self.idle_timeout, self.max_numel = max_length, idle_timeout, max_numel
        self.quotas, self.frame_bytes = quotas, frame_bytes
        self.inflight = InFlight(frame_bytes)  # frame bytes being received, per peer
        self.peer_cache = PeerLedger("cache tokens", max(max_length, quotas.peer_cache_share * cache_tokens))
        self.peer_sessions = PeerLedger("open sessions", quotas.sessions_per_peer)
        self.on_change = on_change  # the free cache changed: announce soon
        self.batcher = Batcher(lane)
        self._open: dict[str, ServerSession] = {}

    def __len__(self) -> int:
        return len(self._open)

    async def read_frame(self, stream, timeout: float) -> object:
        """A frame of a session or a training call from a peer: at most `frame_bytes`, its body within
        `Quotas.frame_seconds` once begun, and read only while the peer's frames in flight leave room."""
        return await wire.read_frame(stream, timeout=timeout, max_size=self.frame_bytes,
                                     body_timeout=self.quotas.frame_seconds, budget=self.inflight)

    def lengths(self) -> list[int]:
        """Tokens in each open session's cache, ascending."""
        return sorted(s.cache.length for s in self._open.values())

    async def serve(self, stream, opened: OpenSession, span: Span, lora: LoraWeights | None) -> None:
        """Admit the session `opened` on `stream`, answer it, and run it until it closes."""
        check_compression(opened.compression)
        if not 1 <= opened.batch_size <= MAX_BATCH:
            raise BadRequest(f"OpenSession.batch_size: {opened.batch_size} is outside 1..{MAX_BATCH}")
        if not 1 <= opened.max_length <= self.max_length:
            raise BadRequest(f"OpenSession.max_length: {opened.max_length} is outside 1..{self.max_length}")
        owner = stream.muxed_conn.peer_id.to_base58()
        tokens = opened.max_length * opened.batch_size
        self._admit(owner, tokens)
        session_id = secrets.token_urlsafe(18)
        self.on_change()
        self.counters.sessions_opened += 1
        self.counters.sessions_open += 1
        log.info("session %s from %s: blocks %d:%d, batch %d, max_length %d", session_id[:8], short_id(owner),
                 span.start, span.end, opened.batch_size, opened.max_length)
        session = ServerSession(self, session_id, owner, opened, span, stream,
                                functools.partial(self.step, lora=lora, peer=owner))
        try:
            self._open[session_id] = session
            await wire.write_frame(stream, SessionOpened(session_id, opened.max_length).to_wire())
            await session.run()
        finally:
            self._open.pop(session_id, None)
            self.budget.release(tokens)
            self.peer_cache.refund(owner, tokens)
            self.peer_sessions.refund(owner, 1)
            self.counters.sessions_open -= 1
            self.on_change()
            log.info("session %s closed", session_id[:8])

    def _admit(self, owner: str, tokens: int) -> None:
        """Charge a new session to its opener and to the server's cache, or answer `busy` with nothing held."""
        undo: list[Callable[[], None]] = []
        try:
            self.peer_sessions.charge(owner, 1)
            undo.append(lambda: self.peer_sessions.refund(owner, 1))
            self.peer_cache.charge(owner, tokens)
            undo.append(lambda: self.peer_cache.refund(owner, tokens))
            self.budget.reserve(tokens)
        except wire.Busy:
            for refund in reversed(undo):
                refund()
            self.counters.busy_refusals += 1
            raise

    async def step(self, span: Span, cache: SpanCache, step: Step, lora: LoraWeights | None = None,
                   peer: str = "") -> torch.Tensor:
        """One step of a session: its position checked against the cache, then the span in the lane, a long
        step in chunks (other peers' work runs between them). Charged to `peer`, the session's opener."""
        batch, new = step.hidden.shape[:2]
        if batch * new > self.quotas.step_tokens:
            raise BadRequest(f"Step.hidden: {batch} × {new} tokens; at most {self.quotas.step_tokens} per step")
        cache.start_at(step.position)  # steps of a session come one at a time: its cache is its own
        if self.batcher.takes(new, step.prompts is not None):  # may share a pass with other sessions' steps
            span.check(step.hidden, step.position_ids, step.attention_mask, cache)
            return await self.batcher.run(span, Row(cache, step.hidden, step.position_ids, step.attention_mask),
                                          lora, peer)
        outputs, a = [], 0
        while a < new or not outputs:
            out, n = await self.lane.run_chunk(lambda n: _run_chunk(span, cache, step, a, a + n, lora),
                                               max(new - a, 1), batch, peer)
            outputs.append(out)
            a += n
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def handle_push(self, stream) -> None:
        """Steps pushed by the previous server of a chain, each to one of our sessions that names the
        pushing peer as its predecessor; anything else is answered with an error and dropped."""
        sender = stream.muxed_conn.peer_id.to_base58()
        while True:
            try:
                frame = await self.read_frame(stream, self.idle_timeout + 60)
            except wire.StreamClosed:
                return
            step = Step.from_wire(frame, max_numel=self.max_numel)
            session = self._open.get(step.session_id)
            if session is None or not await session.takes_pushes_from(sender):
                self.counters.pushes_refused += 1
                err = BadRequest(f"no session {step.session_id[:8]} of yours here",
                                 hint="pushes go only to a session whose opener named you as its predecessor")
                await wire.write_frame(stream, wire.error_frame(err, step_id=step.step_id))
                continue
            await session.deliver_push(step)

    async def wait_closed(self, timeout: float) -> None:
        """Let open sessions finish for up to `timeout` s, then cancel the rest."""
        with trio.move_on_after(timeout):
            while self._open:
                await trio.sleep(0.1)
        for session in list(self._open.values()):
            session.cancel()


def _run_chunk(span: Span, cache: SpanCache, step: Step, a: int, b: int, lora: LoraWeights | None) -> torch.Tensor:
    """Tokens [a, b) of a step through the span (deep prompts cover the step's first positions)."""
    prompts = step.prompts[:, :, a:b] if step.prompts is not None and a < step.prompts.shape[2] else None
    mask = step.attention_mask[:, a:b] if step.attention_mask is not None else None
    with torch.no_grad():
        out = span(step.hidden[:, a:b], step.position_ids[:, a:b], cache, mask, prompts, lora)
    return out.to(step.hidden.device, step.hidden.dtype)  # to the host inside the lane's call: the wait for a
    # GPU is the lane's, and the history kept for replays holds no device memory


class ServerSession:
    """One session: its cache, its inbox (client steps and pushed steps, in arrival order), its push link."""

    def __init__(self, owner: Sessions, session_id: str, peer: str, opened: OpenSession, span: Span,
                 client_stream, step_fn: StepFn) -> None:
        self.node = owner.node
        self.key = owner.node.host.get_private_key()  # signs this session's commitments
        self.id = session_id
        self.peer = peer  # who opened it: only its stream controls the session
        self.prev = opened.prev  # the only peer whose pushes it takes
        self._prev_changed = trio.Event()
        self.opened = opened
        self.span = span
        self.cache = span.new_cache(opened.batch_size, opened.max_length)
        self.client_stream = client_stream
        self.step_fn = step_fn
        self.counters = owner.counters
        self.idle_timeout = owner.idle_timeout
        self.max_numel = owner.max_numel
        self.read_frame = owner.read_frame
        self.next: NextHop | None = opened.next
        self.inbox_send, self.inbox_recv = trio.open_memory_channel[tuple[str, Step]](INBOX)
        self._client_lock = trio.Lock()
        self._push_stack: AsyncExitStack | None = None
        self._push_stream = None
        self._push_relayed = False  # whether the push stream's connection goes through a relay
        self._cancel = trio.CancelScope()
        self.outputs: list[Step] = []  # pushed outputs, in position order

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

    async def takes_pushes_from(self, peer: str) -> bool:
        """Whether `peer` is this session's predecessor; waits briefly for a `Predecessor` naming it, which
        the opener may have sent on another connection at the same time as the push was made."""
        with trio.move_on_after(PREDECESSOR_WAIT):
            while self.prev != peer:
                await self._prev_changed.wait()
        return self.prev == peer

    async def deliver_push(self, step: Step) -> None:
        await self.inbox_send.send(("push", step))

    async def _read_client(self, done: trio.CancelScope) -> None:
        while True:
            try:
                frame = await self.read_frame(self.client_stream, self.idle_timeout)
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
                compression = "none" if msg.exact else self.opened.compression
                await self._send_client(self.history(msg.before).to_wire(compression))
                continue
            if isinstance(msg, Predecessor):
                self.prev = msg.peer_id
                self._prev_changed.set()
                self._prev_changed = trio.Event()
                continue
            if isinstance(msg, Relink):
                await self._close_push()
                self.next = msg.next
                log.info("session %s relinked to %s", self.id[:8], short_id(msg.next.peer_id) if msg.next else "-")
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
            if source == "push" and not (step.commitments and step.commitments[-1].matches(step.hidden)):
                self.counters.errors += 1
                bad = PeerUnavailable(f"{short_id(self.prev)} pushed values that differ from its signed commitment")
                await self._send_client(wire.error_frame(bad, step_id=step.step_id, peer_id=self.prev))
                continue
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
            out = as_received(out, self.opened.compression)  # what the next hop (or client) decodes
            commitments = [*step.commitments, Commitment.make(self.key, self.id, step.position, out)]
            if self.next is not None:
                await self._push(step, out, commitments)
            self._keep(step, out)
            if self.next is not None:
                continue
            if not step.want_output:
                out = out[:, :0]
            result = StepResult(step.step_id, step.position, out, commitments)
            await self._send_client(result.to_wire(self.opened.compression))

    def _keep(self, step: Step, out: torch.Tensor) -> None:
        """Keep what we pushed: the next server's inputs, to rebuild a replacement's cache after a failure."""
        trim_steps(self.outputs, step.position)  # a re-sent step replaces what followed it
        self.outputs.append(Step(step.step_id, step.position, out, step.position_ids, step.attention_mask))

    def history(self, before: int) -> History:
        return concat_steps(self.outputs, before, self.opened.batch_size, self.span.hidden_size)

    async def _push(self, step: Step, out: torch.Tensor, commitments: list[Commitment]) -> None:
        nxt = self.next
        pushed = Step(step.step_id, step.position, out, step.position_ids, step.attention_mask, None,
                      session_id=nxt.session_id, want_output=step.want_output, commitments=commitments)
        try:
            if self._push_stream is None:
                await self._open_push(nxt)
            await wire.write_frame(self._push_stream, pushed.to_wire(self.opened.compression))
            self.counters.pushes_sent += 1
            self.counters.pushes_relayed += self._push_relayed
        except (MeshError, trio.TooSlowError) as e:
            await self._close_push()
            failed = PeerUnavailable(f"push to {short_id(nxt.peer_id)} failed: {e}".splitlines()[0])
            await self._send_client(wire.error_frame(failed, step_id=step.step_id, peer_id=nxt.peer_id))

    async def _open_push(self, nxt: NextHop) -> None:
        # dialled only where the swarm (the peer's own signed announcement) or the peerstore says it is
        stack = AsyncExitStack()
        self._push_stream = await stack.enter_async_context(self.node.stream(nxt.peer_id, "push", timeout=10))
        self._push_stack = stack
        self._push_relayed = is_relayed(self._push_stream.muxed_conn)
        # The next server answers on the push stream only when it cannot take a step (e.g. unknown session).
        self.node.nursery.start_soon(self._read_push_errors, self._push_stream, nxt.peer_id)

    async def _read_push_errors(self, stream, peer_id: str) -> None:
        """Errors the next server reports on the push stream, passed on to our client as that server's.
        The next server is a peer like any other: what it writes is re-made, never forwarded as it is."""
        while True:
            try:
                frame = await wire.read_frame(stream, timeout=self.idle_timeout + 60, max_size=1 << 16,
                                              body_timeout=10)
            except wire.WireError:
                return
            try:
                wire.raise_if_error(frame)
            except MeshError as e:  # the client reroutes around the next hop, whatever it said
                step_id = getattr(e, "step_id", None)
                failed = PeerUnavailable(f"next hop {short_id(peer_id)}: {e.one_line()}"[:300])
                await self._send_client(wire.error_frame(failed, peer_id=peer_id, **(
                    {"step_id": step_id} if step_id is not None else {})))
                continue
            log.info("session %s: %s wrote a non-error frame on the push stream; dropping the link",
                     self.id[:8], short_id(peer_id))
            await wire.reset_quietly(stream)
            return

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
