"""A server's compute lane: all of its torch work, one piece at a time, shared fairly among peers.

One lane per server because its blocks are one device's work: two computations at once would only share
the same cores (or GPU) and finish no sooner. Work runs in a worker thread, so the event loop keeps
answering pings, gossip and other sessions meanwhile; a decode step of a few tokens runs on the event loop
itself instead, which saves a thread handoff (~1 ms per hop) and delays other tasks by one short step at
most.

Fairness is by time, not by turns: the lane next serves the waiting peer that has used it least lately
(lane seconds decayed with a half-life of `HALF_LIFE`), and the work one peer may have waiting is capped
(`Busy` past it). A long prefill is cut into chunks by its caller (`run_chunk`), sized when its turn
comes: large while nobody else is using the lane, small while another peer is.

A decoding client sends its next step a few milliseconds after the previous one's answer; by then a
flooding peer would have started its next chunk, and each decode step would wait for a whole chunk. So
after a short step of a peer that has used no more than its share, the lane waits up to `ANTICIPATE` for
that peer's next step before turning to others: a decoding peer gets its half of the lane against any
flood, and others lose at most `ANTICIPATE` per such step. Short steps of several sessions share one turn
(`net/batching.py`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from typing import Callable, TypeVar

import trio

from .quotas import PeerLedger

__all__ = ["ComputeLane", "PeerUsage", "INLINE_TOKENS", "CONTENDED_CHUNK", "HALF_LIFE", "ANTICIPATE"]

INLINE_TOKENS = 4  # work on at most this many tokens (batch × length) runs on the event loop
CONTENDED_CHUNK = 16  # prefill chunk while other peers use the lane: ~2 decode steps of compute on a CPU
HALF_LIFE = 1.0  # s: lane time a peer used counts half as much this much later
ANTICIPATE = 0.02  # s the lane waits for a decoding peer's next step (more than a loopback or LAN round trip)
ACTIVE = 0.005  # s of decayed use below which a peer no longer counts as using the lane
T = TypeVar("T")


class PeerUsage:
    """Lane seconds each peer used, decayed with a half-life: recent use counts, old use fades."""

    def __init__(self, half_life: float = HALF_LIFE) -> None:
        self.rate = math.log(2) / half_life
        self._used: dict[str, tuple[float, float]] = {}  # peer -> (decayed seconds, as of when)

    def of(self, peer: str, now: float) -> float:
        used, at = self._used.get(peer, (0.0, now))
        return used * math.exp(-self.rate * (now - at))

    def add(self, peer: str, seconds: float, now: float) -> None:
        self._used[peer] = (self.of(peer, now) + seconds, now)

    def active(self, now: float) -> set[str]:
        """Peers whose decayed use still counts (forgetting the rest)."""
        for peer in [p for p in self._used if self.of(p, now) < ACTIVE]:
            del self._used[peer]
        return set(self._used)


class ComputeLane:
    """Runs torch work one piece at a time, the least-served waiting peer first, and adds up its wall time."""

    def __init__(self, inline_tokens: int = INLINE_TOKENS, queued_tokens_per_peer: float = float("inf"),
                 chunk: int = 256) -> None:
        self.inline_tokens = inline_tokens
        self.chunk = chunk
        self.seconds = 0.0
        self.queued = PeerLedger("queued compute tokens", queued_tokens_per_peer)
        self.usage = PeerUsage()
        self._busy = False
        self._held_for: str | None = None  # a decoding peer the lane waits for, until `_hold_until`
        self._hold_until = 0.0
        self._waiting: dict[str, deque[tuple[int, trio.Event]]] = {}
        self._order = itertools.count()
        self._changed = trio.Event()  # set (and replaced) whenever the lane is granted or held

    async def run(self, fn: Callable[[], T], tokens: int | None = None, peer: str = "") -> T:
        """`fn()` in the lane on behalf of `peer`; on the event loop when `tokens` is given and small, else
        in a thread. `Busy` if the peer already has its quota of tokens waiting."""
        return await self._in_turn(peer, tokens or 0, lambda: (fn, tokens))

    async def run_sized(self, work: Callable[[], tuple[Callable[[], T], int | None]], tokens: int, peer: str) -> T:
        """Like `run`, but what runs is decided when the lane turns to `peer`: `work()` returns the function
        and its size in tokens (None: in a thread; batching takes every step queued by then)."""
        return await self._in_turn(peer, tokens, work)

    async def run_chunk(self, fn: Callable[[int], T], remaining: int, batch: int, peer: str) -> tuple[T, int]:
        """The next part of a long step: `fn(n)` computes its next n of `remaining` positions (each `batch`
        rows). n is chosen when the lane turns to this peer, so it is small if others use the lane *then*,
        not when the work was queued. Returns fn's result and n."""
        chosen: list[int] = []

        def sized() -> tuple[Callable[[], T], int]:
            n = min(remaining, max(1, self.chunk_tokens(peer) // batch))
            chosen.append(n)
            return (lambda: fn(n)), batch * n

        return await self._in_turn(peer, batch * min(remaining, self.chunk), sized), chosen[0]

    def chunk_tokens(self, peer: str) -> int:
        """How many tokens of a long step `peer` should compute per turn: small while others use the lane."""
        others = (self.usage.active(trio.current_time()) | set(self._waiting)) - {peer}
        return min(self.chunk, CONTENDED_CHUNK) if others else self.chunk

    async def _in_turn(self, peer: str, cost: int, work: Callable[[], tuple[Callable[[], T], int | None]]) -> T:
        """Queue `cost` tokens for `peer`, wait for its turn, then run the function `work()` returns at that
        moment (with its size in tokens: on the event loop if small)."""
        self.queued.charge(peer, cost)
        try:
            await self._acquire(peer)
            t0 = time.perf_counter()
            short = False
            try:
                fn, tokens = work()
                short = tokens is not None and tokens <= self.inline_tokens
                if short:
                    return self._timed(fn)
                return await trio.to_thread.run_sync(self._timed, fn)
            finally:
                self._release(peer, time.perf_counter() - t0, short)
        finally:
            self.queued.refund(peer, cost)

    def _free_for(self, peer: str) -> bool:
        held = self._held_for is not None and trio.current_time() < self._hold_until
        return not self._busy and (self._held_for == peer or not held and not self._waiting)

    async def _acquire(self, peer: str) -> None:
        if self._free_for(peer):
            self._busy, self._held_for = True, None
            return
        ready = trio.Event()
        entry = (next(self._order), ready)
        self._waiting.setdefault(peer, deque()).append(entry)
        try:
            while not ready.is_set():
                changed = self._changed
                held = not self._busy and self._held_for not in (None, peer)
                with trio.move_on_at(self._hold_until if held else math.inf):
                    await changed.wait()
                if not ready.is_set() and not self._busy and self._held_for is not None \
                        and trio.current_time() >= self._hold_until:
                    self._held_for = None  # the decoding peer did not come back in time
                    self._grant_next()
        except BaseException:
            if ready.is_set():  # handed the lane as we were cancelled: pass it on
                self._release(peer, 0.0, False)
            else:
                queue = self._waiting[peer]
                queue.remove(entry)
                if not queue:
                    del self._waiting[peer]
            raise

    def _release(self, peer: str, seconds: float, short: bool) -> None:
        """Count the work, then hold the lane briefly for a decoding peer under its share, or hand it on."""
        now = trio.current_time()
        self.usage.add(peer, seconds, now)
        self._busy = False
        if short and self._under_share(peer, now):
            if peer in self._waiting:
                self._grant(peer)
            else:
                self._held_for, self._hold_until = peer, now + ANTICIPATE
                self._notify()  # waiters now wait for the hold to end
            return
        self._held_for = None
        self._grant_next()

    def _under_share(self, peer: str, now: float) -> bool:
        peers = self.usage.active(now) | set(self._waiting) | {peer}
        total = sum(self.usage.of(p, now) for p in peers)
        return self.usage.of(peer, now) <= total / len(peers)

    def _grant_next(self) -> None:
        """The lane to the waiting peer that used it least lately (the earliest arrival among equals)."""
        if self._waiting:
            now = trio.current_time()
            self._grant(min(self._waiting, key=lambda p: (self.usage.of(p, now), self._waiting[p][0][0])))

    def _grant(self, peer: str) -> None:
        queue = self._waiting[peer]
        _, ready = queue.popleft()
        if not queue:
            del self._waiting[peer]
        self._busy = True
        ready.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _timed(self, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds += time.perf_counter() - t0
