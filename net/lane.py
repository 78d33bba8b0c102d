"""A server's compute lane: all of its torch work, one piece at a time, shared fairly among peers.

One lane per server because its blocks are one device's work: two computations at once would only share
the same cores (or GPU) and finish no sooner. Work runs in a worker thread, so the event loop keeps
answering pings, gossip and other sessions meanwhile; a decode step of a few tokens runs on the event loop
itself instead, which saves a thread handoff (~1 ms per hop) and delays other tasks by one short step at
most.

Fairness: waiting work is queued per peer and the lane takes the peers' queues in turn, so a peer with
many sessions or a deep queue gets one turn per round like everybody else, and the work one peer may have
waiting is capped (`Busy` past it). A long prefill is cut into chunks by its caller (`chunk_tokens`):
large while nobody else is using the lane, small while another peer is, so another peer's decode step
waits for one small chunk at most. Batching concurrent sessions will replace the inside of `run`, not
its callers.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, TypeVar

import trio

from .quotas import PeerLedger

__all__ = ["ComputeLane", "INLINE_TOKENS", "CONTENDED_CHUNK", "RECENT"]

INLINE_TOKENS = 4  # work on at most this many tokens (batch × length) runs on the event loop
CONTENDED_CHUNK = 16  # prefill chunk while other peers use the lane: ~2 decode steps of compute on a CPU
RECENT = 1.0  # s: a peer that ran work this recently counts as using the lane
T = TypeVar("T")


class ComputeLane:
    """Runs torch work one piece at a time, the waiting peers in turn, and adds up its wall time."""

    def __init__(self, inline_tokens: int = INLINE_TOKENS, queued_tokens_per_peer: float = float("inf"),
                 chunk: int = 256) -> None:
        self.inline_tokens = inline_tokens
        self.chunk = chunk
        self.seconds = 0.0
        self.queued = PeerLedger("queued compute tokens", queued_tokens_per_peer)
        self._busy = False
        self._waiting: dict[str, deque[trio.Event]] = {}
        self._turns: deque[str] = deque()  # peers with waiting work, in the order they get the lane
        self._last_run: dict[str, float] = {}  # peer -> when its last work ended (trio clock)

    async def run(self, fn: Callable[[], T], tokens: int | None = None, peer: str = "") -> T:
        """`fn()` in the lane on behalf of `peer`; on the event loop when `tokens` is given and small, else
        in a thread. `Busy` if the peer already has its quota of tokens waiting."""
        cost = tokens or 0
        self.queued.charge(peer, cost)
        try:
            await self._acquire(peer)
            try:
                if tokens is not None and tokens <= self.inline_tokens:
                    return self._timed(fn)
                return await trio.to_thread.run_sync(self._timed, fn)
            finally:
                self._last_run[peer] = trio.current_time()
                self._release()
        finally:
            self.queued.refund(peer, cost)

    def chunk_tokens(self, peer: str) -> int:
        """How many tokens of a long step `peer` should compute per turn: small while others use the lane."""
        now = trio.current_time()
        for other, t in list(self._last_run.items()):
            if now - t > RECENT:
                del self._last_run[other]
        others = any(p != peer for p in self._waiting) or any(p != peer for p in self._last_run)
        return min(self.chunk, CONTENDED_CHUNK) if others else self.chunk

    async def _acquire(self, peer: str) -> None:
        if not self._busy and not self._turns:
            self._busy = True
            return
        ready = trio.Event()
        queue = self._waiting.get(peer)
        if queue is None:
            queue = self._waiting[peer] = deque()
            self._turns.append(peer)
        queue.append(ready)
        try:
            await ready.wait()
        except BaseException:
            if ready.is_set():  # handed the lane as we were cancelled: pass it on
                self._release()
            else:
                queue.remove(ready)
                if not queue:
                    del self._waiting[peer]
                    self._turns.remove(peer)
            raise

    def _release(self) -> None:
        """Hand the lane to the next peer in turn (its oldest work), or mark it free."""
        if not self._turns:
            self._busy = False
            return
        peer = self._turns.popleft()
        queue = self._waiting[peer]
        ready = queue.popleft()
        if queue:
            self._turns.append(peer)
        else:
            del self._waiting[peer]
        ready.set()

    def _timed(self, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds += time.perf_counter() - t0
