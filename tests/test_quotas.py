"""Per-peer quotas: parsing `--limit`, charging a peer's share, and frame bytes in flight per peer."""

from __future__ import annotations

import pytest
import trio

from mesh.model.errors import BadRequest
from mesh.net import wire
from mesh.net.quotas import InFlight, PeerLedger, Quotas, parse_limits


def test_limits_parse_by_name_and_refuse_what_they_do_not_know():
    q = parse_limits(["sessions_per_peer=8", "peer-cache-share=0.25"])
    assert q.sessions_per_peer == 8 and q.peer_cache_share == 0.25 and q.adapter_rank == Quotas().adapter_rank
    for bad, words in (("foo=1", "NAME=VALUE"), ("sessions_per_peer=x", "not an integer"),
                       ("frame_seconds=-1", "positive"), ("adapter_rank", "NAME=VALUE")):
        with pytest.raises(BadRequest, match=words):
            parse_limits([bad])


def test_a_peer_is_refused_past_its_cap_and_others_are_not():
    ledger = PeerLedger("cache tokens", 100)
    ledger.charge("a", 60)
    with pytest.raises(wire.Busy, match="cache tokens"):
        ledger.charge("a", 50)
    ledger.charge("b", 100)
    ledger.refund("a", 60)
    ledger.charge("a", 100)
    assert ledger.held("a") == 100 and ledger.held("b") == 100


async def test_a_peers_frames_in_flight_wait_for_room_and_others_do_not():
    inflight = InFlight(cap=100)
    order = []

    async def frame(peer: str, size: int, hold: float) -> None:
        async with inflight.hold(peer, size):
            order.append((peer, size))
            await trio.sleep(hold)

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(frame, "a", 80, 0.2)  # one big frame of "a" is always let in
            await trio.sleep(0.01)
            n.start_soon(frame, "a", 50, 0)  # waits: "a" would hold 130
            n.start_soon(frame, "b", 80, 0)  # another peer: at once
            await trio.sleep(0.1)
            assert order == [("a", 80), ("b", 80)]
    assert order[-1] == ("a", 50)
