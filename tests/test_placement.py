"""Placement on constructed swarms: span choice, move decisions, the never-disconnect rule, no flapping."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mesh.balancing.placement import (Placed, best_start, block_throughputs, choose_span, plan_move,
                                      replace_all)
from mesh.balancing.simulator import SimConfig, draw_arrivals, simulate, upper_bound
from mesh.balancing.throughput import Measurement, server_throughput


def test_best_start_takes_the_weakest_block_then_the_next():
    assert best_start(np.array([5, 5, 0, 0, 5, 5.0]), 2) == 2
    # windows sorted: [1, 3], [1, 3], [1, 2]: the third's second-weakest block is weaker
    assert best_start(np.array([1, 3, 1, 2.0]), 2) == 2
    assert best_start(np.zeros(10), 4) == 0  # ties: leftmost
    t = np.array([0, 9, 9, 9, 9, 1.0])
    assert best_start(t, 3) == 0 and best_start(t, 3, must_cover=(3, 5)) == 3
    assert best_start(t, 3, must_cover=(2, 5)) == 2


def test_newcomers_fill_gaps_then_the_weakest_stretch():
    spans, placed = [], []
    for i in range(4):
        a, b = choose_span(placed, 12, 30)
        spans.append((a, b))
        placed.append(Placed(f"p{i}", a, b, 10.0))
    assert spans[:3] == [(0, 12), (12, 24), (18, 30)]
    t = block_throughputs(placed, 30)
    assert t.min() == 10.0  # all 30 covered, and the fourth went where only one server was


def test_a_server_moves_to_cover_blocks_a_dead_server_left():
    # A and D both hold 0:12, C holds 18:30; B (12:24) died: 12:18 is uncovered.
    others = [Placed("d", 0, 12, 10.0), Placed("c", 18, 30, 10.0)]
    plan = plan_move(Placed("a", 0, 12, 10.0), others, 30, rng=random.Random(0))
    assert plan.move and plan.start == 6 and plan.bottleneck == 0 and plan.expected == 10.0


def test_never_leaves_a_block_only_it_covers():
    # A alone holds 0:12; a gap at 12:18. Moving A anywhere would open 0:12 or part of it.
    others = [Placed("c", 18, 30, 10.0)]
    plan = plan_move(Placed("a", 0, 12, 10.0), others, 30, rng=random.Random(0))
    assert not plan.move
    # With a partner on 0:6 only, A may move right as far as it keeps 6:12.
    others = [Placed("c", 18, 30, 10.0), Placed("e", 0, 6, 10.0)]
    plan = plan_move(Placed("a", 0, 12, 10.0), others, 30, rng=random.Random(0))
    assert plan.move and plan.start == 6  # covers 6:18: its sole blocks 6:12 and the gap 12:18


def test_small_gains_do_not_move():
    # The bottleneck is 12:24 at 19 against 20 elsewhere: a move would gain at most a few percent.
    others = [Placed("b", 0, 12, 10.0), Placed("c", 12, 24, 9.5), Placed("d", 12, 24, 9.5),
              Placed("e", 24, 36, 10.0), Placed("f", 24, 36, 10.0)]
    plan = plan_move(Placed("a", 0, 12, 10.0), others, 36, rng=random.Random(0))
    assert not plan.move
    assert plan_move(Placed("a", 0, 12, 10.0), others, 36, min_gain=0.0, rng=random.Random(0)).move is False


def test_a_balanced_swarm_does_not_move():
    servers = [Placed(f"s{i}", a, a + 10, 7.0) for i, a in enumerate([0, 0, 10, 10, 20, 20])]
    for me in servers:
        others = [s for s in servers if s is not me]
        assert not plan_move(me, others, 30, min_gain=0.0, rng=random.Random(1)).move


@pytest.mark.parametrize("seed", range(6))
def test_rebalancing_settles_and_then_nobody_moves(seed):
    """Random mixed swarms: rounds of everyone checking in random order stop moving within a few rounds
    (no flapping), and the bottleneck never falls on a move."""
    rng = random.Random(seed)
    arrivals = draw_arrivals(SimConfig(servers=30, seed=seed))[:30]
    servers = {}
    for a in arrivals:
        start = rng.randint(0, 80 - a.length)
        servers[a.peer_id] = Placed(a.peer_id, start, start + a.length, server_throughput(a.measurement, a.length))
    for rounds in range(1, 30):
        moved = 0
        order = list(servers)
        rng.shuffle(order)
        for peer in order:
            me = servers[peer]
            others = [s for p, s in servers.items() if p != peer]
            before = block_throughputs(servers.values(), 80).min()
            plan = plan_move(me, others, 80, rng=rng)
            if plan.move:
                servers[peer] = Placed(peer, plan.start, plan.start + me.length, me.throughput)
                moved += 1
                assert plan.expected > before
        if not moved:
            break
    assert moved == 0 and rounds <= 12, f"still moving after {rounds} rounds"


def test_throughput_formula():
    m = Measurement(inference_rps=100.0, forward_rps=300.0, network_rps=1000.0)
    assert server_throughput(m, 1) == pytest.approx(150.0)  # 1 / (0.5/100 + 0.5/300)
    assert server_throughput(m, 9) == pytest.approx(30.0)  # used 5 blocks on average
    assert server_throughput(m, 1, relayed=True) == pytest.approx(150.0)
    assert server_throughput(Measurement(100.0, 300.0, 50.0), 1, relayed=True) == pytest.approx(10.0)


def test_replace_all_and_the_bound():
    servers = [Placed(f"s{i}", 0, 10, 5.0) for i in range(6)]
    placed = replace_all(servers, 30)
    assert block_throughputs(placed, 30).min() == 10.0 == upper_bound(servers, 30)


def test_simulator_runs_the_strategies_in_order():
    cfg = SimConfig(servers=20, num_blocks=40, hours=1.0, route_every=0)
    got = {s: simulate(cfg, s, reference=False) for s in ("random", "newcomers", "full")}
    assert got["full"].mean_throughput >= got["newcomers"].mean_throughput >= got["random"].mean_throughput
    assert got["full"].moves > 0 and got["newcomers"].moves == 0
