"""Routing: the least expected time per token, exhaustive search as the oracle."""

from __future__ import annotations

import itertools
import random

import pytest

from mesh.balancing.routing import Candidate, Hop, NoRoute, chain_time, min_latency_chain


def brute_force(servers, start, end, client_rtt, default):
    """Every chain made of (server, exit block) choices; the cheapest by `chain_time`."""
    by_id = {s.peer_id: s for s in servers}
    best = (float("inf"), None)

    def extend(pos, last, chain):
        nonlocal best
        if pos == end:
            t = chain_time(chain, by_id, client_rtt, default)
            if t < best[0]:
                best = (t, list(chain))
            return
        for s in servers:
            if s.peer_id == last or not s.start <= pos < s.end:
                continue
            for b in range(pos + 1, min(s.end, end) + 1):
                extend(b, s.peer_id, chain + [Hop(s.peer_id, pos, b)])

    extend(start, None, [])
    return best


def test_prefers_fewer_hops_when_compute_is_equal():
    servers = [Candidate("a", 0, 10, 100), Candidate("b", 10, 20, 100), Candidate("big", 0, 20, 100)]
    chain = min_latency_chain(servers, 0, 20, {"a": 0.01, "b": 0.01, "big": 0.01})
    assert chain == [Hop("big", 0, 20)]


def test_switches_mid_span_to_a_faster_server():
    servers = [Candidate("slow", 0, 20, 10), Candidate("fast", 5, 20, 1000)]
    chain = min_latency_chain(servers, 0, 20, {"slow": 0.001, "fast": 0.001})
    assert chain == [Hop("slow", 0, 5), Hop("fast", 5, 20)]


def test_uses_announced_server_links():
    servers = [Candidate("a", 0, 10, 100, {"c": 0.001, "b": 0.5}), Candidate("b", 10, 20, 100),
               Candidate("c", 10, 20, 90)]
    chain = min_latency_chain(servers, 0, 20, {"a": 0.01, "b": 0.01, "c": 0.01})
    assert [h.peer_id for h in chain] == ["a", "c"]


def test_a_relayed_server_pays_the_relay_hop_until_measured():
    """Unmeasured, a relayed server's links count twice the default RTT; measured RTTs decide alone."""
    servers = [Candidate("a", 0, 10, 100), Candidate("nat", 10, 20, 120, relayed=True),
               Candidate("open", 10, 20, 100)]
    assert [h.peer_id for h in min_latency_chain(servers, 0, 20, {})] == ["a", "open"]
    by_id = {s.peer_id: s for s in servers}
    unmeasured = chain_time([Hop("a", 0, 10), Hop("nat", 10, 20)], by_id, {})
    direct = chain_time([Hop("a", 0, 10), Hop("open", 10, 20)], by_id, {})
    assert unmeasured - direct == pytest.approx(0.05 + 10 / 120 - 10 / 100)  # (1 extra RTT both ways) / 2 each
    measured = {"a": 0.01, "nat": 0.02, "open": 0.02}
    servers[0] = Candidate("a", 0, 10, 100, {"nat": 0.02, "open": 0.02})
    assert [h.peer_id for h in min_latency_chain(servers, 0, 20, measured)] == ["a", "nat"]


def test_gap_raises_with_the_block():
    with pytest.raises(NoRoute) as err:
        min_latency_chain([Candidate("a", 0, 10, 1), Candidate("b", 12, 20, 1)], 0, 20)
    assert err.value.block == 10


def test_banned_servers_are_avoided_and_subranges_work():
    servers = [Candidate("a", 0, 20, 100), Candidate("b", 0, 20, 50)]
    assert min_latency_chain(servers, 5, 15, banned=frozenset({"a"})) == [Hop("b", 5, 15)]


@pytest.mark.parametrize("seed", range(40))
def test_matches_exhaustive_search(seed):
    rng = random.Random(seed)
    n = 8
    servers = []
    for i in range(rng.randint(2, 5)):
        a = rng.randrange(0, n - 1)
        b = rng.randint(a + 1, n)
        pings = {f"s{j}": rng.uniform(0.001, 0.1) for j in range(5) if rng.random() < 0.5}
        servers.append(Candidate(f"s{i}", a, b, rng.uniform(5, 200), pings))
    servers.append(Candidate("full", 0, n, rng.uniform(1, 20)))
    client = {s.peer_id: rng.uniform(0.001, 0.1) for s in servers if rng.random() < 0.7}
    chain = min_latency_chain(servers, 0, n, client)
    by_id = {s.peer_id: s for s in servers}
    assert chain[0].start == 0 and chain[-1].end == n
    assert all(x.end == y.start and x.peer_id != y.peer_id for x, y in itertools.pairwise(chain))
    expected, _ = brute_force(servers, 0, n, client, 0.05)
    assert chain_time(chain, by_id, client) == pytest.approx(expected, rel=1e-9)


def test_spread_chain_draws_servers_by_throughput():
    import random

    from mesh.balancing.routing import spread_chain

    servers = [Candidate("fast", 0, 4, 30.0), Candidate("slow", 0, 4, 10.0), Candidate("tail", 4, 6, 1.0)]
    rng = random.Random(0)
    firsts = [spread_chain(servers, 0, 6, rng)[0].peer_id for _ in range(2000)]
    assert 0.7 < firsts.count("fast") / 2000 < 0.8  # 30 / (30 + 10)
    chain = spread_chain(servers, 1, 6, rng, banned=frozenset({"fast"}))
    assert [(h.peer_id, h.start, h.end) for h in chain] == [("slow", 1, 4), ("tail", 4, 6)]
    with pytest.raises(NoRoute):
        spread_chain(servers, 0, 6, rng, banned=frozenset({"tail"}))


def test_a_server_slower_than_it_announced_is_ranked_by_what_it_delivered():
    from mesh.net.announce import ServerInfo, ServerState
    from mesh.net.chain import Measured, candidates

    liar = ServerInfo("liar", "m", 0, 4, ServerState.ONLINE, inference_rps=1e6)
    honest = ServerInfo("honest", "m", 0, 4, ServerState.ONLINE, inference_rps=100.0)
    measured = Measured()
    route = min_latency_chain(candidates([liar, honest], measured=measured), 0, 4, {"liar": 0.01, "honest": 0.01})
    assert [h.peer_id for h in route] == ["liar"]
    for _ in range(20):  # its steps take 10^5 times what it announced
        measured.record(["liar"], 1e5)
    measured.record(["honest"], 0.5)  # faster than announced counts as announced
    assert measured.factor("honest") == 1.0 and measured.factor("liar") > 1e4
    route = min_latency_chain(candidates([liar, honest], measured=measured), 0, 4, {"liar": 0.01, "honest": 0.01})
    assert [h.peer_id for h in route] == ["honest"]
