"""A swarm in simulated time, to compare placement strategies under churn.

Servers of mixed compute and memory arrive as a Poisson process and leave after exponential lifetimes
(abruptly: no drain). Each strategy sees the same arrivals, departures and hardware (drawn from `seed`);
only where servers sit differs. Placement runs the live servers' own code (`placement.choose_span`,
`placement.plan_move`) and the announced per-block throughput comes from `throughput.server_throughput`.

Strategies:
- `random`: a newcomer takes a uniformly random span; nobody moves.
- `newcomers`: a newcomer takes `choose_span`; nobody moves.
- `full`: as `newcomers`, and every server runs `plan_move` every U(0, 2 × balance_period) seconds.

A server counts only once its span is loaded (`load_seconds_per_block` × its blocks, after joining and
after each move; a mover serves nothing while it reloads, the case where memory allows no overlap).

Measured every `sample_every` seconds after a `warmup` (the first population joining): the swarm
throughput `min(T)` over loaded servers. At every `reference_stride`-th sample (the same instants for every
strategy): `replaced`, min(T) when all servers present are re-placed at once with full knowledge and no
loading time (`placement.replace_all`), and `upper_bound`, what no placement of them could beat (see its
docstring). `routed` (every `route_every` s) is what clients get when each picks the fastest chain (the
live routing code) with the capacity the clients before it left.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass, field

import numpy as np

from .placement import (MIN_GAIN, Placed, block_throughputs, choose_span, plan_move,
                        reacts, replace_all)
from .routing import Candidate, NoRoute, min_latency_chain
from .throughput import Measurement, server_throughput

__all__ = ["SimConfig", "Arrival", "SimResult", "draw_arrivals", "upper_bound", "routed_throughput", "simulate"]

STRATEGIES = ("random", "newcomers", "full")


@dataclass(frozen=True)
class SimConfig:
    """A simulated swarm: model size, arrivals and lifetimes, timings, and the sampling."""

    num_blocks: int = 80
    servers: int = 50  # mean population: arrival rate × mean lifetime
    hours: float = 6.0
    mean_lifetime: float = 6 * 3600.0
    balance_period: float = 120.0  # mean seconds between a server's rebalancing checks
    load_seconds_per_block: float = 1.0
    sample_every: float = 60.0
    warmup: float = 1200.0
    reference_stride: int = 10
    route_every: float = 1800.0  # 0: never
    min_gain: float = MIN_GAIN
    detect_seconds: float = 15.0  # a silent server's entry expires after this
    react_window: float = 30.0  # others check within U(0, this) of noticing a departure (0: periodic only)
    seed: int = 0


@dataclass(frozen=True)
class Arrival:
    """One server of the simulation: when it comes, when it leaves, its blocks and speed."""

    peer_id: str
    time: float
    leaves: float
    length: int  # blocks its memory holds
    measurement: Measurement


@dataclass
class SimResult:
    """A strategy's run: the swarm's throughput over time, moves, and the references."""

    strategy: str
    times: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)  # min(T) at each sample
    reference_index: list[int] = field(default_factory=list)  # samples where the references were taken
    replaced: list[float] = field(default_factory=list)  # min(T) of replace_all at those samples
    bound: list[float] = field(default_factory=list)  # upper_bound at those samples
    routed: list[float] = field(default_factory=list)
    moves: int = 0
    server_hours: float = 0.0

    @property
    def mean_throughput(self) -> float:
        return float(np.mean(self.throughput))

    @property
    def mean_at_references(self) -> float:
        return float(np.mean([self.throughput[i] for i in self.reference_index]))

    @property
    def mean_replaced(self) -> float:
        return float(np.mean(self.replaced))

    @property
    def mean_bound(self) -> float:
        return float(np.mean(self.bound))

    @property
    def moves_per_server_hour(self) -> float:
        return self.moves / max(self.server_hours, 1e-9)


def draw_arrivals(cfg: SimConfig) -> list[Arrival]:
    """The population at t=0 (joining over the first minute) plus Poisson arrivals; hardware is mixed:
    compute spans ~40× (log-normal) and memory holds 4 to 40 blocks, independently."""
    rng = random.Random(cfg.seed)
    horizon = cfg.hours * 3600
    times = sorted(rng.uniform(0, 60) for _ in range(cfg.servers))
    t = 0.0
    rate = cfg.servers / cfg.mean_lifetime
    while True:
        t += rng.expovariate(rate)
        if t >= horizon:
            break
        times.append(t)
    out = []
    for i, at in enumerate(times):
        rps = 100 * rng.lognormvariate(0, 0.9)
        m = Measurement(inference_rps=rps, forward_rps=4 * rps, network_rps=1e9)
        length = min(cfg.num_blocks, rng.randint(4, 40))
        out.append(Arrival(f"s{i:05d}", at, at + rng.expovariate(1 / cfg.mean_lifetime), length, m))
    return out


def upper_bound(servers: list[Placed], num_blocks: int) -> float:
    """No placement beats spreading the total block-throughput evenly: a server adds its throughput to
    exactly `length` blocks wherever it sits, so sum(T) = sum(throughput × length) for every placement and
    min(T) ≤ mean(T). This is the bound (d): the optimum of an instant re-placement of everyone is at most it."""
    return sum(s.throughput * s.length for s in servers) / num_blocks


def routed_throughput(servers: list[Placed], num_blocks: int, max_clients: int = 10_000) -> float:
    """Clients arrive one by one; each takes the fastest chain (`min_latency_chain`) given the capacity
    left, and uses all that is left along it. Summed client tokens/s; a server's capacity is its per-block
    throughput, shared by every token that passes through it."""
    left = {s.peer_id: s.throughput for s in servers}
    total = 0.0
    for _ in range(max_clients):
        cands = [Candidate(s.peer_id, s.start, s.end, left[s.peer_id]) for s in servers
                 if left[s.peer_id] > 1e-9]
        try:
            chain = min_latency_chain(cands, 0, num_blocks)
        except NoRoute:
            break
        rate = min(left[h.peer_id] for h in chain)
        for h in chain:
            left[h.peer_id] -= rate
        total += rate
    return total


def simulate(cfg: SimConfig, strategy: str, reference: bool = True) -> SimResult:
    """Run one strategy; `reference=False` skips the re-placement and bound (they do not depend on it)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    return _Run(cfg, strategy, reference).run()


class _Run:
    """One simulated run: the event queue, where each server is, and the samples taken."""

    def __init__(self, cfg: SimConfig, strategy: str, reference: bool) -> None:
        self.cfg, self.strategy, self.reference = cfg, strategy, reference
        self.rng = random.Random(cfg.seed + 1)
        self.result = SimResult(strategy)
        self.present: dict[str, Placed] = {}  # where each server is (or is loading)
        self.ready: dict[str, float] = {}  # when its current span starts counting
        self.events: list[tuple[float, int, str, str]] = []
        self.tie = itertools.count()
        self.arrivals = {a.peer_id: a for a in draw_arrivals(cfg)}
        for a in self.arrivals.values():
            self.push(a.time, "arrive", a.peer_id)
            self.push(a.leaves, "leave", a.peer_id)
        self.next_route = cfg.route_every if cfg.route_every > 0 else math.inf

    def push(self, at: float, kind: str, peer: str) -> None:
        heapq.heappush(self.events, (at, next(self.tie), kind, peer))

    def run(self) -> SimResult:
        cfg, horizon = self.cfg, self.cfg.hours * 3600
        sample = cfg.warmup
        while self.events:
            now, _, kind, peer = heapq.heappop(self.events)
            if now > horizon:
                break
            while sample <= now:
                self.take_sample(sample)
                sample += cfg.sample_every
            if kind == "arrive":
                self.arrive(peer, now)
            elif kind == "leave":
                self.leave(peer, now)
            elif peer in self.present:
                self.check(peer, now, again=kind == "check")
        while sample <= horizon:
            self.take_sample(sample)
            sample += cfg.sample_every
        self.result.server_hours += sum((horizon - self.arrivals[p].time) / 3600 for p in self.present)
        return self.result

    def take_sample(self, now: float) -> None:
        cfg, result = self.cfg, self.result
        loaded = [s for p, s in self.present.items() if self.ready[p] <= now]
        result.times.append(now)
        result.throughput.append(float(block_throughputs(loaded, cfg.num_blocks).min()))
        if (len(result.throughput) - 1) % cfg.reference_stride == 0:
            result.reference_index.append(len(result.throughput) - 1)
            if self.reference:
                everyone = list(self.present.values())
                result.replaced.append(float(block_throughputs(replace_all(everyone, cfg.num_blocks),
                                                               cfg.num_blocks).min()))
                result.bound.append(upper_bound(everyone, cfg.num_blocks))
        if now >= self.next_route:
            result.routed.append(routed_throughput(loaded, cfg.num_blocks))
            self.next_route += cfg.route_every

    def arrive(self, peer: str, now: float) -> None:
        cfg, a = self.cfg, self.arrivals[peer]
        tput = server_throughput(a.measurement, a.length)
        if self.strategy == "random":
            start = self.rng.randint(0, cfg.num_blocks - a.length)
            span = (start, start + a.length)
        else:
            span = choose_span(list(self.present.values()), a.length, cfg.num_blocks)
        self.present[peer] = Placed(peer, span[0], span[1], tput)
        self.ready[peer] = now + cfg.load_seconds_per_block * a.length
        if self.strategy == "full":
            self.push(now + self.rng.uniform(0, 2 * cfg.balance_period), "check", peer)

    def leave(self, peer: str, now: float) -> None:
        if peer not in self.present:
            return
        cfg = self.cfg
        self.result.server_hours += (now - self.arrivals[peer].time) / 3600
        del self.present[peer]
        if self.strategy == "full" and cfg.react_window > 0:  # the others notice when its entry expires
            for other in self.present:
                if reacts(self.rng, len(self.present)):
                    self.push(now + cfg.detect_seconds + self.rng.uniform(0, cfg.react_window), "recheck", other)

    def check(self, peer: str, now: float, again: bool) -> None:
        """A rebalancing check (periodic when `again`, else a reaction to a departure)."""
        cfg, me = self.cfg, self.present[peer]
        if self.ready[peer] <= now:
            others = [s for p, s in self.present.items() if p != peer]
            plan = plan_move(me, others, cfg.num_blocks, min_gain=cfg.min_gain, rng=self.rng)
            if plan.move:
                self.present[peer] = Placed(peer, plan.start, plan.start + me.length, me.throughput)
                self.ready[peer] = now + cfg.load_seconds_per_block * me.length
                self.result.moves += 1
        if again:
            self.push(now + self.rng.uniform(0, 2 * cfg.balance_period), "check", peer)
