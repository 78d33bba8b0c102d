"""What one peer may take of a server: its share of the cache, sessions, queued compute, kept training
graphs and adapters, and the size of each frame it sends.

An open swarm has no trusted clients, so every resource a request holds is charged to the peer that
sent it, and each peer's charge is capped well below the server's total: one peer can fill its own share,
never the whole server. Connections and streams per peer are capped by libp2p's own resource manager
(`net/peerlimits.py`); the charges here are the ones only mesh knows how to count. `mesh serve --limit
NAME=VALUE` sets any of them; docs/security.md lists them with their defaults.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import trio

from ..model.errors import BadRequest
from . import wire

__all__ = ["Quotas", "PeerLedger", "InFlight", "parse_limits"]


@dataclass(frozen=True)
class Quotas:
    """Per-peer caps of a server (sizes in tokens unless named otherwise)."""

    peer_cache_share: float = 0.5  # of the server's cache tokens one peer's sessions may hold
    sessions_per_peer: int = 32  # open inference sessions of one peer
    step_tokens: int = 4096  # batch × new tokens in one session step or training pass
    queued_tokens_per_peer: int = 8192  # one peer's tokens waiting for or in the compute lane
    prefill_chunk: int = 256  # a longer step is computed in chunks of this many tokens, other peers between
    kept_graphs_per_peer: int = 4  # training forward graphs kept for one peer's backwards
    adapters_per_peer: int = 4  # LoRA adapters of one peer a server keeps
    adapter_rank: int = 64  # the largest LoRA rank a server accepts
    frame_seconds: float = 30.0  # a frame, once begun, must arrive within this

    def frame_bytes(self, hidden_size: int) -> int:
        """The largest frame a session or training call needs: a step of `step_tokens` tokens carries
        hidden states (and a backward also their gradient) at up to 4 bytes per value, plus positions and
        mask, plus headroom for deep prompts and msgpack framing."""
        return 4 * self.step_tokens * hidden_size * 4 + (1 << 20)


def parse_limits(items: list[str], base: Quotas | None = None) -> Quotas:
    """`["sessions_per_peer=8", …]` → Quotas: unknown names and values of the wrong type are refused."""
    quotas = base or Quotas()
    kinds = {f.name: f.type for f in dataclasses.fields(Quotas)}
    changes: dict[str, float | int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in kinds:
            raise BadRequest(f"--limit {item!r}: expected NAME=VALUE", hint=f"NAME is one of {', '.join(kinds)}")
        try:
            number = int(value) if kinds[name] == "int" else float(value)
        except ValueError:
            raise BadRequest(f"--limit {item!r}: {value!r} is not {'an integer' if kinds[name] == 'int' else 'a number'}") from None
        if not number > 0:
            raise BadRequest(f"--limit {item!r}: must be positive")
        changes[name] = number
    return dataclasses.replace(quotas, **changes)


class PeerLedger:
    """How much of one resource each peer holds, refusing a charge past the peer's cap (`Busy`)."""

    def __init__(self, what: str, cap: float) -> None:
        self.what = what
        self.cap = cap
        self._held: defaultdict[str, float] = defaultdict(float)

    def held(self, peer: str) -> float:
        return self._held.get(peer, 0.0)

    def charge(self, peer: str, amount: float) -> None:
        if self._held[peer] + amount > self.cap:
            raise wire.Busy(f"peer quota: {self.what} {self._held[peer] + amount:g} would exceed {self.cap:g}",
                            hint="finish or close earlier requests first")
        self._held[peer] += amount

    def refund(self, peer: str, amount: float) -> None:
        left = self._held.get(peer, 0.0) - amount
        if left <= 1e-9:
            self._held.pop(peer, None)
        else:
            self._held[peer] = left


class InFlight:
    """Bytes of frames being received from each peer. A frame's body is read only while its peer has less
    than `cap` bytes in flight (or none): a peer that begins many large frames and stalls holds one
    frame's worth of memory, and its other frames wait (their deadline running), not other peers'."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._held: defaultdict[str, int] = defaultdict(int)
        self._released = trio.Event()

    @asynccontextmanager
    async def hold(self, peer: str, size: int) -> AsyncIterator[None]:
        while self._held.get(peer, 0) and self._held[peer] + size > self.cap:
            await self._released.wait()
        self._held[peer] += size
        try:
            yield
        finally:
            self._held[peer] -= size
            if not self._held[peer]:
                del self._held[peer]
            self._released.set()
            self._released = trio.Event()
