"""Where a server sits: the span it takes on joining, and whether it should move later.

The swarm is as fast as its weakest block. `T[b]`, the sum of the per-block throughput of every server
holding block b, is what one more server can raise; `min(T)` is the swarm's throughput.

- **Joining** (`best_start`): among all windows of the server's length, take the one whose throughputs,
  sorted ascending, are lexicographically smallest: the weakest block first, then the next weakest. Ties go
  to the leftmost window, so every peer computes the same answer from the same table.
- **Moving** (`plan_move`): a server leaves its span only if (1) it would not leave a block uncovered that
  only it covers (the never-disconnect rule: the new span must contain all such blocks), (2) its best
  start elsewhere differs from where it is, with a small bias towards staying, and the move on its own
  does not lower `min(T)` (others may never follow), and (3) replaying the others' best
  responses after that move (up to MAX_RESPONDERS of them, a few rounds) raises `min(T)` by more than
  `min_gain` (a fraction). The bias and
  the gain threshold are what keep a balanced swarm still.

Pure: numpy only, so the live servers and the simulator run this same code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["MIN_GAIN", "reacts", "Placed", "MovePlan", "block_throughputs", "best_start", "choose_span",
           "sole_blocks", "plan_move", "replace_all", "blocks_for_memory"]

STAY_BIAS = 1e-3  # a mover sees its own span as this fraction of its throughput weaker: ties keep it put
COVERED = 1e-9  # a block whose summed throughput is at most this is uncovered
MIN_GAIN = 0.10  # move only when the swarm's bottleneck would rise by more than this fraction
MAX_PASSES = 4  # rounds of everyone else's best response when judging a move
MAX_RESPONDERS = 64  # others whose response is replayed (a random sample in large swarms; the rest stay)
REACTORS = 64  # servers expected to re-check after a departure: each does with probability REACTORS / N


def reacts(rng: random.Random, swarm_size: int) -> bool:
    """Whether this server re-checks after seeing a departure: in a large swarm only ~REACTORS of them do,
    since one mover suffices and every check costs a plan."""
    return rng.random() < REACTORS / max(swarm_size, 1)


@dataclass(frozen=True)
class Placed:
    """A server as placement sees it: its span and its per-block throughput."""

    peer_id: str
    start: int
    end: int
    throughput: float

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class MovePlan:
    """Whether a server should move, where, and why (for its log)."""

    move: bool
    start: int  # where to go; the current start when staying
    bottleneck: float  # min(T) now
    expected: float  # min(T) after the move and everyone's best response (= bottleneck when staying)
    reason: str


def block_throughputs(servers: Iterable[Placed], num_blocks: int) -> np.ndarray:
    """T[b] for b in 0..num_blocks-1. Summed in peer-id order so every peer gets bit-identical floats."""
    t = np.zeros(num_blocks)
    for s in sorted(servers, key=lambda s: s.peer_id):
        t[max(0, s.start):min(s.end, num_blocks)] += s.throughput
    return t


def best_start(t: np.ndarray, length: int, must_cover: tuple[int, int] | None = None) -> int:
    """Start of the window of `length` blocks that helps the weakest blocks most (see module docstring).

    `must_cover=(a, b)`: only windows containing blocks [a, b) qualify (the never-disconnect rule).
    """
    n = len(t)
    length = min(length, n)
    starts = np.arange(n - length + 1)
    if must_cover is not None:
        a, b = must_cover
        starts = starts[(starts <= a) & (starts + length >= b)]
        if starts.size == 0:
            raise ValueError(f"no window of {length} blocks contains blocks {a}:{b}")
    windows = t[starts[:, None] + np.arange(length)]
    weakest = windows.min(axis=1)
    tied = np.flatnonzero(weakest == weakest.min())
    if tied.size == 1:
        return int(starts[tied[0]])
    order = np.lexsort(np.sort(windows[tied], axis=1).T[::-1])  # stable: equal windows keep the leftmost
    return int(starts[tied[order[0]]])


def choose_span(others: Sequence[Placed], length: int, num_blocks: int) -> tuple[int, int]:
    """The span a newcomer of `length` blocks should take, given everyone already placed."""
    length = max(1, min(length, num_blocks))
    start = best_start(block_throughputs(others, num_blocks), length)
    return start, start + length


def sole_blocks(t_without: np.ndarray, start: int, end: int) -> tuple[int, int] | None:
    """The smallest range containing every block of [start, end) that nobody else covers (None if none)."""
    alone = np.flatnonzero(t_without[start:end] <= COVERED)
    if alone.size == 0:
        return None
    return start + int(alone[0]), start + int(alone[-1]) + 1


def _respond(t: np.ndarray, s: Placed, pos: int) -> int:
    """One server's best response in the table `t` (which includes it at `pos`); updates `t` in place."""
    end = pos + s.length
    t[pos:end] -= s.throughput
    must = sole_blocks(t, pos, end)
    t[pos:end] -= s.throughput * STAY_BIAS
    new = best_start(t, s.length, must)
    t[pos:end] += s.throughput * STAY_BIAS
    t[new:new + s.length] += s.throughput
    return new


def _settle(t: np.ndarray, servers: Sequence[Placed], pos: dict[str, int], rounds: int,
            rng: random.Random | None = None) -> None:
    """Rounds of best responses (in random order when `rng` is given) until nobody moves; updates `t` and
    `pos` in place."""
    for _ in range(rounds):
        order = list(servers)
        if rng is not None:
            rng.shuffle(order)
        moved = False
        for s in order:
            new = _respond(t, s, pos[s.peer_id])
            moved |= new != pos[s.peer_id]
            pos[s.peer_id] = new
        if not moved:
            return


def plan_move(me: Placed, others: Sequence[Placed], num_blocks: int, *, min_gain: float = MIN_GAIN,
              rng: random.Random | None = None) -> MovePlan:
    """Should `me` move, and where? See the module docstring for the three conditions."""
    rng = rng or random.Random()
    everyone = [*others, me]
    t = block_throughputs(everyone, num_blocks)
    bottleneck = float(t.min())
    new = _respond(t, me, me.start)
    if new == me.start:
        return MovePlan(False, me.start, bottleneck, bottleneck, "already at the best span")
    alone = float(t.min())
    if alone < bottleneck:  # a move that only pays off if others follow may leave the swarm worse
        return MovePlan(False, me.start, bottleneck, alone,
                        f"moving to {new} alone would lower the bottleneck {bottleneck:.3g} → {alone:.3g}")
    responders = rng.sample(list(others), min(len(others), MAX_RESPONDERS))
    _settle(t, responders, {s.peer_id: s.start for s in responders}, MAX_PASSES, rng)
    expected = float(t.min())
    if expected <= COVERED or expected <= bottleneck * (1 + min_gain) and bottleneck > COVERED:
        return MovePlan(False, me.start, bottleneck, expected,
                        f"moving to {new} would change the bottleneck {bottleneck:.3g} → {expected:.3g}")
    return MovePlan(True, new, bottleneck, expected,
                    f"moving to {new} raises the bottleneck {bottleneck:.3g} → {expected:.3g}")


def replace_all(servers: Sequence[Placed], num_blocks: int, max_rounds: int = 20) -> list[Placed]:
    """Everyone placed afresh with full knowledge: joins in order of capacity (throughput × length, largest
    first) by `best_start`, then rounds of best responses until nobody moves."""
    order = sorted(servers, key=lambda s: (-s.throughput * s.length, s.peer_id))
    t = np.zeros(num_blocks)
    pos: dict[str, int] = {}
    for s in order:
        pos[s.peer_id] = best_start(t, s.length)
        t[pos[s.peer_id]:pos[s.peer_id] + s.length] += s.throughput
    _settle(t, order, pos, max_rounds)
    return [Placed(s.peer_id, pos[s.peer_id], pos[s.peer_id] + s.length, s.throughput) for s in order]


def blocks_for_memory(budget_bytes: float, block_bytes: float, cache_bytes_per_block: float,
                      reserve_bytes: float, num_blocks: int) -> int:
    """How many blocks fit: each needs its weights and its share of the attention cache, after a reserve
    for one request's working memory. At least 1, at most the whole model."""
    usable = budget_bytes - reserve_bytes
    return max(1, min(num_blocks, int(usable // (block_bytes + cache_bytes_per_block))))
