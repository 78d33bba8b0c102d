"""Client side of routed inference: a chain of server sessions with server-to-server push, and failover.

The client opens one session per hop of the chain (`net/chain.py`), last hop first so that each server can
be told the session it pushes to. Per token it sends one `Step` to the first server and waits only for the
last server's `StepResult`.

When a hop fails (broken stream, error reply, a step past its deadline, or the server announcing
DRAINING/OFFLINE), the client replaces exactly that hop's blocks: it routes the blocks [start, end) over
other servers, rebuilds their caches by replaying the hop's inputs — its own steps for the first hop,
otherwise the outputs the previous server kept (`HistoryRequest`) — relinks the pushes around it, and
re-sends the step. Steps carry their position, so every re-send is idempotent and the result is the
same tokens as without the failure. Failed peers are banned by this client for a growing time.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch
import trio

from ..balancing.routing import Hop
from ..model.errors import CacheTrimmed, MeshError, Rewind
from . import wire
from .chain import ChainConfig, ChainOpener, HopLink, RouteUnavailable, close_quietly
from .client import ping
from .messages import History, Step, StepResult
from .steplog import concat_steps, trim_steps
from .announce import ServerInfo, ServerState
from .verify import StepRecord, Verdict, spot_check
from .wire import short_id

log = logging.getLogger("mesh.inference")

__all__ = ["InferenceSession", "open_inference_session", "HopFailed", "is_exact", "Check", "CHECK_LAG"]

MAX_RECOVERIES = 6  # per step
CHECK_LAG = 4  # steps a spot check may run beside before the next step waits for it
BASE_TIMEOUT = 5.0


class HopFailed(MeshError):
    """A step failed at hop `index`, or somewhere unknown (None: no result came back in time)."""

    code = "unavailable"

    def __init__(self, index: int | None, message: str, ban: bool = True) -> None:
        super().__init__(message)
        self.index = index
        self.ban = ban  # False: the hop is sound but must be rebuilt (its cache no longer reaches back)


def is_exact(info: ServerInfo) -> bool:
    """Servers whose outputs equal the reference model's: float32 weights, no quantization."""
    return info.quant == "none" and info.dtype == "float32"


@dataclass
class Check:
    """A spot check of positions [0, end) running beside the session's steps, and what it found."""

    end: int
    steps: int = 0  # steps taken since it started
    done: trio.Event = field(default_factory=trio.Event)
    liars: dict[str, Verdict] = field(default_factory=dict)


class InferenceSession:
    """`step()` sends new tokens' hidden states through the chain and returns the last hop's output.

    The session owns the chain (`hops`, one `HopLink` each), the steps it sent to the first hop (`inputs`,
    the replay history of a replacement first hop) and recovery; `ChainOpener` plans and opens chains."""

    def __init__(self, cfg: ChainConfig, nursery: trio.Nursery) -> None:
        self.cfg = cfg
        self.nursery = nursery
        self.opener = ChainOpener(cfg, self._deadline, self._next_step_id)
        self.hops: list[HopLink] = []
        self.inputs: list[Step] = []  # every step sent to the first hop, trimmed on re-sends
        self.records: list[StepRecord] = []  # each step's commitments, for spot checks
        self.recoveries = 0
        self._step_ids = 0
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self._shapes: dict[int, tuple[int, ...]] = {}  # step id -> the shape its result must have
        self._check: Check | None = None  # the spot check running beside the steps, if any
        self._check_due = False  # one came due while another ran

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    def describe(self) -> str:
        return " → ".join(f"{short_id(h.hop.peer_id)}[{h.hop.start}:{h.hop.end}]" for h in self.hops)

    async def open(self) -> None:
        self.hops = await self.opener.open_route(0, self.cfg.num_blocks, self.cfg.bans.banned(), None)
        self._start_readers(self.hops)
        log.info("inference session through %s", self.describe())

    # ----- stepping ------------------------------------------------------------------------------

    async def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position: int) -> torch.Tensor:
        """The last hop's output for these new tokens; `position` is how many tokens the caches should
        hold before them (servers ahead of it roll back)."""
        msg = Step(0, position, hidden, position_ids, attention_mask)
        trim_steps(self.inputs, position)
        self.inputs.append(msg)
        self.records = [r for r in self.records if r.position + r.tokens <= position]  # what stands
        checker = self.cfg.checker
        if checker is not None:  # positions fed again (rejected drafts) are checked again
            checker.verified_to, checker.floor = min(checker.verified_to, position), min(checker.floor, position)
            # a check that ran meanwhile and found a liar rewinds; one running for CHECK_LAG steps is waited
            # for, so a lie is acted on within max_gap + CHECK_LAG + 1 steps (the check due by then starts
            # when the one running at the lie has ended, at most CHECK_LAG + 1 steps later)
            check = self._check
            if check is not None:
                check.steps += 1
            await self._take_check(wait=check is not None and check.steps > CHECK_LAG)
        failure: HopFailed | None = None
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                if failure is not None:  # a recovery may itself fail (e.g. a hop's history is bad): retried
                    await self._recover(failure, position)
                    failure = None
                await self._leave_draining(position)
                out = await self._step_once(msg)
                break
            except HopFailed as e:
                failure = e
        else:
            raise RouteUnavailable(f"gave up after {MAX_RECOVERIES} failed recoveries: {failure}") from failure
        if checker is not None:  # a check due while another runs starts when that one ends
            self._check_due = checker.due() or self._check_due
            if self._check_due and self._check is None:
                self._check, self._check_due = Check(position + hidden.shape[1]), False  # beside the next steps
                self.nursery.start_soon(self._run_check, self._check)
        return out

    async def spot_check(self, end: int) -> None:
        """Check every hop's outputs for positions [0, end) now (net/verify.py), after the check that may
        be running; raises `Rewind` after replacing hops caught lying."""
        await self._take_check(wait=True)
        await self._act_on(await spot_check(self, end))

    async def _run_check(self, check: Check) -> None:
        try:
            check.liars = await spot_check(self, check.end)
        except (MeshError, trio.TooSlowError) as e:  # a check that fails says nothing about anyone
            log.info("spot check to position %d failed: %s", check.end, e)
        finally:
            check.done.set()

    async def _take_check(self, wait: bool) -> None:
        """Act on the background check if it has finished (or, with `wait`, once it has)."""
        check = self._check
        if check is None or not (wait or check.done.is_set()):
            return
        await check.done.wait()
        self._check = None
        await self._act_on(check.liars)

    async def _act_on(self, liars: dict[str, Verdict]) -> None:
        """Convict the proven liars, route around every one, and rewind to the first wrong position."""
        if not liars:
            return
        first = min(v.first_bad for v in liars.values())
        for peer, verdict in liars.items():
            if verdict.proven:
                self.cfg.checker.convict(peer, verdict.evidence)
            else:
                log.warning("%s: %s; routing around it", short_id(peer), verdict.evidence)
        in_chain = [i for i, h in enumerate(self.hops) if h.hop.peer_id in liars]
        if in_chain:
            await self._replace(in_chain, ban=True, before=first)
        trim_steps(self.inputs, first)
        self.records = [r for r in self.records if r.position + r.tokens <= first]
        raise Rewind(first)

    async def _recover(self, failure: HopFailed, position: int) -> None:
        """Replace the hops `failure` blames (or, if it names none, those that do not answer)."""
        e = failure
        who = f"hop {e.index} ({short_id(self.hops[e.index].hop.peer_id)})" if e.index is not None else "a hop"
        log.warning("%s failed: %s", who, e)
        t0 = time.perf_counter()
        dead = sorted(await self._dead_hops(e.index))
        log.info("hops %s to replace, found in %.0f ms", dead, (time.perf_counter() - t0) * 1e3)
        await self._replace(dead, ban=e.ban, before=position, exclude=e.ban)

    def _expected(self, links: list[HopLink], tokens: int) -> float:
        """Compute + network time of a step through `links` as their servers announced them."""
        expected = 0.0
        for h in links:
            expected += (h.hop.end - h.hop.start) * tokens / max(h.info.inference_rps, 1e-3)
            expected += self.cfg.rtt.rtt.get(h.hop.peer_id, 0.05)
        return expected

    def _deadline(self, links: list[HopLink], tokens: int) -> float:
        """How long a step through `links` may take: what they announced, with a wide margin."""
        return BASE_TIMEOUT + 4 * self._expected(links, tokens)

    def _next_step_id(self) -> int:
        self._step_ids += 1
        return self._step_ids

    async def _step_once(self, msg: Step) -> torch.Tensor:
        step = Step(self._next_step_id(), msg.position, msg.hidden, msg.position_ids, msg.attention_mask)
        send, receive = trio.open_memory_channel(1)
        self._waiting[step.step_id] = send
        self._shapes[step.step_id] = tuple(msg.hidden.shape)
        timeout = self._deadline(self.hops, msg.hidden.shape[1])
        try:
            try:
                await self.hops[0].send(step, timeout)
            except wire.WireError as e:
                raise HopFailed(0, f"cannot send: {e}") from e
            t0 = trio.current_time()
            with trio.move_on_after(timeout):
                outcome = await receive.receive()
                if isinstance(outcome, BaseException):
                    raise outcome
                took = trio.current_time() - t0
                self.cfg.measured.record([h.hop.peer_id for h in self.hops],
                                         took / max(self._expected(self.hops, msg.hidden.shape[1]), 1e-6))
                signed = [(h.hop.peer_id, h.session.session_id, c) for h, c in zip(self.hops, outcome.commitments)]
                self.records.append(StepRecord(msg.position, msg.hidden.shape[1], signed))
                return outcome.hidden
            raise HopFailed(None, f"no result within {timeout:.1f} s")
        finally:
            self._waiting.pop(step.step_id, None)
            self._shapes.pop(step.step_id, None)

    # ----- what the hops' readers report ---------------------------------------------------------

    def _start_readers(self, links: list[HopLink]) -> None:
        for link in links:
            self.nursery.start_soon(link.read, self._on_result, self._on_error)

    def _on_result(self, link: HopLink, result: StepResult) -> None:
        waiter = self._waiting.get(result.step_id)
        if waiter is None or not self.hops or link is not self.hops[-1]:  # only the last hop answers steps
            return
        if tuple(result.hidden.shape) != self._shapes[result.step_id]:  # a server's answer is checked too
            self._on_error(link, MeshError(f"server {short_id(link.hop.peer_id)} answered a step with hidden "
                                           f"states {list(result.hidden.shape)}, not {list(self._shapes[result.step_id])}"),
                           link.hop.peer_id, result.step_id)
            return
        if len(result.commitments) != len(self.hops) or not result.commitments[-1].matches(result.hidden):
            self._on_error(link, MeshError(f"server {short_id(link.hop.peer_id)} answered a step without the "
                                           f"chain's commitments, or with values it did not commit to"),
                           link.hop.peer_id, result.step_id)
            return
        try:
            waiter.send_nowait(result)
        except trio.WouldBlock:  # a second answer to the same step: the first one stands
            pass

    def _on_error(self, link: HopLink, error: MeshError, failed_peer: str | None, step_id: int | None) -> None:
        """`failed_peer`: the hop to blame (a broken stream, a failed push); None passes `error` on as it is.
        A hop may blame only itself or its neighbours in the chain: any other name is its own failure."""
        if link not in self.hops:  # a hop replaced meanwhile: nothing waits on it
            return
        if isinstance(error, CacheTrimmed):  # a rewind deeper than its windowed layers keep: replay it there
            error = HopFailed(self.hops.index(link), str(error), ban=False)
        elif failed_peer is not None:  # its predecessor: a push that was not what it committed to
            own = self.hops.index(link)
            after = own + 1 if own + 1 < len(self.hops) and self.hops[own + 1].hop.peer_id == failed_peer else \
                own - 1 if own > 0 and self.hops[own - 1].hop.peer_id == failed_peer else own
            error = HopFailed(after, str(error))
        targets = [self._waiting[step_id]] if step_id in self._waiting else list(self._waiting.values())
        for waiter in targets:
            try:
                waiter.send_nowait(error)
            except trio.WouldBlock:
                pass

    # ----- recovery ------------------------------------------------------------------------------

    async def _dead_hops(self, hint: int | None) -> set[int]:
        """Which hops are gone: the one a failure names; after a timeout (no name), those that do not
        answer a ping or are no longer ONLINE in the table."""
        if hint is not None:
            return {hint}
        dead: set[int] = set()

        async def check(i: int) -> None:
            peer = self.hops[i].hop.peer_id
            info = self.cfg.table.get(peer)
            if info is None or info.state != ServerState.ONLINE:
                dead.add(i)
                return
            try:
                await ping(self.cfg.node, peer, count=1, timeout=2.0)
            except Exception:
                dead.add(i)

        async with trio.open_nursery() as n:
            for i in range(len(self.hops)):
                n.start_soon(check, i)
        return dead or {len(self.hops) - 1}

    async def _leave_draining(self, position: int) -> None:
        """Move off servers that announced they are going away, before they take a step down with them."""
        leaving = [i for i, h in enumerate(self.hops) if (info := self.cfg.table.get(h.hop.peer_id)) is not None
                   and info.state == ServerState.DRAINING]
        if leaving:
            log.info("leaving draining server(s) %s", ", ".join(short_id(self.hops[i].hop.peer_id) for i in leaving))
            await self._replace(leaving, ban=False, before=position)

    async def _replace(self, dead: list[int], *, ban: bool, before: int, exclude: bool = True) -> None:
        """Replace hops `dead` (indices) with new sessions whose caches hold positions [0, before), on other
        servers (`exclude`) or on any, their own included (a sound hop that must be rebuilt)."""
        for i in dead:
            if ban:
                self.cfg.bans.ban(self.hops[i].hop.peer_id)
        banned = self.cfg.bans.banned() | ({self.hops[i].hop.peer_id for i in dead} if exclude else frozenset())
        # contiguous runs of dead hops are replaced together; handle the last run first (indices stay valid)
        runs: list[list[int]] = []
        for i in sorted(dead):
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in reversed(runs):
            await self._replace_run(run[0], run[-1], banned, before)
        self.recoveries += 1
        log.info("route now %s", self.describe())

    async def _replace_run(self, first: int, last: int, banned: frozenset[str], before: int) -> None:
        start, end = self.hops[first].hop.start, self.hops[last].hop.end
        t0 = time.perf_counter()
        history = await self._inputs_of(first, before)
        t1 = time.perf_counter()
        after = self.hops[last + 1] if last + 1 < len(self.hops) else None
        before_run = self.hops[first - 1].hop.peer_id if first > 0 else ""
        new = await self.opener.open_route(start, end, banned, None, replay=history, prev=before_run)
        log.info("blocks %d:%d rebuilt on %s: history of %d tokens in %.0f ms, open + replay in %.0f ms",
                 start, end, ", ".join(short_id(link.hop.peer_id) for link in new), history.hidden.shape[1],
                 (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)
        if after is not None:  # the new tail pushes to the hop after the run, which must take its pushes
            await after.session.accept_pushes_from(new[-1].hop.peer_id)
            await new[-1].session.relink(after.as_next_hop())
        old = self.hops[first:last + 1]
        self.hops[first:last + 1] = new
        if first > 0:
            await self.hops[first - 1].session.relink(new[0].as_next_hop())
        self._start_readers(new)
        for link in old:
            self.nursery.start_soon(link.close)

    async def _inputs_of(self, index: int, before: int) -> History:
        """What hop `index` received for positions [0, before): our own steps, or its predecessor's outputs
        (checked: a predecessor that cannot give them whole fails too)."""
        hidden_size = self.inputs[0].hidden.shape[2] if self.inputs else 0
        if index == 0:
            return concat_steps(self.inputs, before, self.cfg.batch_size, hidden_size)
        try:
            history = await self.hops[index - 1].history(before)
        except (MeshError, trio.TooSlowError) as e:
            raise HopFailed(index - 1, f"no history from hop {index - 1}: {e}") from e
        want = (self.cfg.batch_size, before)
        if tuple(history.hidden.shape) != (*want, hidden_size) or tuple(history.position_ids.shape) != want \
                or tuple(history.attention_mask.shape) != want:
            raise HopFailed(index - 1, f"hop {index - 1} sent a history of {list(history.hidden.shape)}")
        return history


@asynccontextmanager
async def open_inference_session(cfg: ChainConfig) -> AsyncIterator[InferenceSession]:
    """An inference session through the swarm, open for the block's duration."""
    async with trio.open_nursery() as nursery:
        session = InferenceSession(cfg, nursery)
        try:
            await session.open()
            yield session
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                for link in session.hops:
                    await close_quietly(link.stack)
                if cfg.checker is not None:
                    await cfg.checker.aclose()
