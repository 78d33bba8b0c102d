"""A server's compute lane: all of its torch work, one piece at a time.

One lane per server because its blocks are one device's work: two computations at once would only share
the same cores (or GPU) and finish no sooner. Work runs in a worker thread, so the event loop keeps
answering pings, gossip and other sessions meanwhile; a decode step of a few tokens runs on the event loop
itself instead, which saves a thread handoff (~1 ms per hop) and delays other tasks by one short step at
most. Batching concurrent sessions will replace the inside of `run`, not its callers.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import trio

__all__ = ["ComputeLane", "INLINE_TOKENS"]

INLINE_TOKENS = 4  # work on at most this many tokens (batch × length) runs on the event loop
T = TypeVar("T")


class ComputeLane:
    """Runs torch work one piece at a time and adds up its wall time (`seconds`)."""

    def __init__(self, inline_tokens: int = INLINE_TOKENS) -> None:
        self.inline_tokens = inline_tokens
        self.seconds = 0.0
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[[], T], tokens: int | None = None) -> T:
        """`fn()` in the lane; on the event loop when `tokens` is given and small, else in a thread."""
        if tokens is not None and tokens <= self.inline_tokens:
            async with self._limiter:
                return self._timed(fn)
        return await trio.to_thread.run_sync(self._timed, fn, limiter=self._limiter)

    def _timed(self, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds += time.perf_counter() - t0
