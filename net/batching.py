"""Continuous batching: the decode steps of sessions waiting for the compute lane run as one pass.

A server's sessions decode one token at a time each; alone, every such step is a batch-1 pass that
leaves most of the device idle. Each short step (at most `MAX_STEP_TOKENS` new tokens, no deep prompts)
is queued here and asks the lane for a turn as before. Whoever's turn comes first takes every queued step
that can share its pass (same blocks, same adapter, same number of new tokens, no sliding-window cache:
`model/batch.py`), up to `MAX_ROWS` rows, and runs them together; the others find their step done when
they wake. While other sessions are decoding, a step first waits up to `GATHER` (5 ms) for theirs to
queue; that is the longest any step is held for a batch to fill (it gave the loopback swarm of
bench/batching.py about a fifth more tokens/s at 8 clients, and a lower p95 step). Sessions join and
leave between steps, and a lone session runs exactly as before.

Each step is checked on its own before it is queued (shape, position, length), so one peer's bad step
never fails another's. The lane's time for a pass is charged to the peer whose turn it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import trio

from ..model.batch import Row, batchable, run_rows
from ..model.errors import MeshError
from ..model.lora import LoraWeights
from ..model.span import Span
from .lane import ComputeLane

__all__ = ["Batcher", "BatchStats", "MAX_ROWS", "MAX_STEP_TOKENS"]

MAX_ROWS = 32  # rows of one pass: past this a pass is compute-bound and gains nothing from more
MAX_STEP_TOKENS = 4  # new tokens of a step that may share a pass (a decode step, or a few drafts)
CONCURRENT = 0.1  # s: sessions that stepped this recently are decoding concurrently
GATHER = 0.005  # s a step waits, at most, for the steps of other decoding sessions to join its pass


@dataclass
class _Queued:
    span: Span
    row: Row
    lora: LoraWeights | None
    peer: str
    taken: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    out: torch.Tensor | None = None
    error: BaseException | None = None

    def joins(self, other: "_Queued") -> bool:
        return ((self.span.start, self.span.end) == (other.span.start, other.span.end)
                and self.lora is other.lora and self.row.hidden.shape[1] == other.row.hidden.shape[1])


@dataclass
class BatchStats:
    """Passes run and the rows they carried, for `mesh status`."""

    passes: int = 0
    rows: int = 0
    recent: float = 0.0  # rows per pass, an exponential average over about the last 20 passes

    def add(self, rows: int) -> None:
        self.passes += 1
        self.rows += rows
        self.recent = rows if self.passes == 1 else 0.95 * self.recent + 0.05 * rows


class Batcher:
    """The queue of short steps waiting for the lane, and who runs them."""

    def __init__(self, lane: ComputeLane, max_rows: int = MAX_ROWS) -> None:
        self.lane, self.max_rows = lane, max_rows
        self.stats = BatchStats()
        self._queue: list[_Queued] = []
        self._last_step: dict[int, float] = {}  # session cache -> when its last step ran (trio clock)
        self._arrived = trio.Event()  # set (and replaced) whenever a step is queued

    @property
    def queued(self) -> int:
        return len(self._queue)

    @staticmethod
    def takes(step_tokens: int, has_prompts: bool) -> bool:
        """Whether a step of this size may share a pass (longer ones run alone, in chunks)."""
        return step_tokens <= MAX_STEP_TOKENS and not has_prompts

    async def run(self, span: Span, row: Row, lora: LoraWeights | None, peer: str) -> torch.Tensor:
        """`row` through `span`, in a pass with whatever other steps are queued when the lane is free."""
        item = _Queued(span, row, lora, peer)
        self._queue.append(item)
        self._arrived.set()
        self._arrived = trio.Event()
        tokens = row.hidden.shape[0] * row.hidden.shape[1]
        try:
            await self._gather()
            while not item.taken:
                batch: list[_Queued] = []
                try:
                    await self.lane.run_sized(lambda: self._pass(item, batch), tokens, peer)
                finally:
                    for it in batch:  # taken but not run (cancelled at the lane): their sessions hear of it
                        if it.out is None and it.error is None:
                            it.error = MeshError("the pass carrying this step was cancelled")
                        it.done.set()
        finally:
            if not item.taken:
                self._queue.remove(item)
        await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.out

    def _active(self, now: float) -> int:
        """Sessions decoding concurrently: those whose last step ran within CONCURRENT."""
        return sum(1 for t in self._last_step.values() if now - t <= CONCURRENT)

    async def _gather(self) -> None:
        """With other sessions decoding, wait up to GATHER for their steps to queue (one pass takes them)."""
        now = trio.current_time()
        active = self._active(now)
        deadline = now + GATHER
        while active >= 2 and len(self._queue) < active and trio.current_time() < deadline:
            with trio.move_on_at(deadline):
                await self._arrived.wait()

    def _pass(self, leader: _Queued, batch: list[_Queued]):
        """At the lane's turn: the queued steps that share the leader's pass, and the function that runs it."""
        if leader.taken:  # another pass took it meanwhile
            return (lambda: None), 0
        rows = 0
        for it in list(self._queue):
            if it is leader or (it.joins(leader) and rows + it.row.hidden.shape[0] <= self.max_rows):
                batch.append(it)
                rows += it.row.hidden.shape[0]
        if not batchable(leader.span, [it.row for it in batch]):
            batch[:] = [leader]
        for it in batch:
            it.taken = True
            self._queue.remove(it)
        self.stats.add(sum(it.row.hidden.shape[0] for it in batch))

        def run() -> None:
            try:
                with torch.no_grad():
                    outs = run_rows(leader.span, [it.row for it in batch], leader.lora)
                for it, out in zip(batch, outs):
                    it.out = out.to(it.row.hidden.device, it.row.hidden.dtype)
            except BaseException as e:
                for it in batch:
                    it.error = e

        now = trio.current_time()
        for it in batch:
            self._last_step[id(it.row.cache)] = now
        self._last_step = {k: t for k, t in self._last_step.items() if now - t <= CONCURRENT}
        # Alone, a short pass runs on the event loop (no thread handoff). With other sessions stepping, it runs
        # in a thread, so that their steps arrive and queue meanwhile and the next pass takes them together.
        tokens = sum(it.row.hidden.shape[0] * it.row.hidden.shape[1] for it in batch)
        return run, (tokens if self._active(now) < 2 else None)
