"""Client side of routed inference: a chain of server sessions with server-to-server push, and failover.

The client opens one session per hop of the chain, last hop first so that each server can be told the
session it pushes to. Per token it sends one `Step` to the first server and waits only for the last
server's `StepResult`.

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
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch
import trio

from mesh.balancing.routing import Candidate, Hop, NoRoute, min_latency_chain
from mesh.model.errors import MeshError
from mesh.net import wire
from mesh.net.adapters import ClientLora
from mesh.net.client import RemoteSession, open_session
from mesh.net.latency import RttTracker
from mesh.net.messages import History, HistoryRequest, NextHop, Step, StepResult
from mesh.net.node import Node
from mesh.net.wire import short_id
from mesh.net.steplog import concat_steps, trim_steps
from mesh.net.swarm import ServerInfo, ServerState, SwarmTable, block_ranges

log = logging.getLogger("mesh.inference")

MAX_RECOVERIES = 6  # per step
REPLAY_CHUNK = 512  # tokens per replayed step
BASE_TIMEOUT = 5.0


class RouteUnavailable(MeshError):
    code = "unavailable"


class HopFailed(MeshError):
    """A step failed at hop `index`, or somewhere unknown (None: no result came back in time)."""

    code = "unavailable"

    def __init__(self, index: int | None, message: str) -> None:
        super().__init__(message)
        self.index = index


class OpenFailed(MeshError):
    code = "unavailable"

    def __init__(self, peer_id: str, message: str) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class BanList:
    """Peers that failed us, each banned for 5 s × 2^(failures − 1), capped at 5 minutes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def ban(self, peer_id: str) -> None:
        n = self._count.get(peer_id, 0) + 1
        self._count[peer_id] = n
        self._until[peer_id] = self.clock() + min(300.0, 5.0 * 2 ** (n - 1))

    def banned(self) -> frozenset[str]:
        now = self.clock()
        return frozenset(p for p, t in self._until.items() if t > now)


@dataclass
class HopState:
    hop: Hop
    info: ServerInfo
    session: RemoteSession
    stack: AsyncExitStack  # closes this hop's session
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # its reader task


def is_exact(info: ServerInfo) -> bool:
    """Servers whose outputs equal the reference model's: float32 weights, no quantization."""
    return info.quant == "none" and info.dtype == "float32"


def candidates(servers: list[ServerInfo], throughput: bool = False) -> list[Candidate]:
    """Routing's view of servers: per-block decode rates (latency), or announced throughput (load)."""
    return [Candidate(s.peer_id, s.start, s.end, (s.throughput if throughput else s.inference_rps) or 1.0,
                      dict(s.next_pings), s.relayed) for s in servers]


class InferenceSession:
    """`step()` sends new tokens' hidden states through the chain and returns the last hop's output."""

    def __init__(self, node: Node, table: SwarmTable, rtt: RttTracker, bans: BanList, model_id: str,
                 num_blocks: int, max_length: int, batch_size: int, compression: str, nursery: trio.Nursery,
                 route_wait: float, accept: Callable[[ServerInfo], bool] | None = None,
                 lora: ClientLora | None = None) -> None:
        self.accept = accept or (lambda info: True)  # e.g. only exact (unquantized) servers
        self.lora = lora  # applied by every server of the chain, replacements included
        self.node, self.table, self.rtt, self.bans = node, table, rtt, bans
        self.model_id, self.num_blocks = model_id, num_blocks
        self.max_length, self.batch_size, self.compression = max_length, batch_size, compression
        self.nursery = nursery
        self.route_wait = route_wait
        self.hops: list[HopState] = []
        self.inputs: list[Step] = []  # every step sent to the first hop, trimmed on re-sends
        self.recoveries = 0
        self._step_ids = 0
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self._history: dict[int, trio.MemorySendChannel] = {}

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    def describe(self) -> str:
        return " → ".join(f"{short_id(h.hop.peer_id)}[{h.hop.start}:{h.hop.end}]" for h in self.hops)

    # ----- stepping ------------------------------------------------------------------------------

    async def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position: int) -> torch.Tensor:
        msg = Step(0, position, hidden, position_ids, attention_mask)
        trim_steps(self.inputs, position)
        self.inputs.append(msg)
        for attempt in range(MAX_RECOVERIES + 1):
            await self._leave_draining(position)
            try:
                return await self._step_once(msg)
            except HopFailed as e:
                if attempt == MAX_RECOVERIES:
                    raise RouteUnavailable(f"gave up after {MAX_RECOVERIES} failed recoveries: {e}") from e
                who = f"hop {e.index} ({short_id(self.hops[e.index].hop.peer_id)})" if e.index is not None else "a hop"
                log.warning("%s failed: %s", who, e)
                t0 = time.perf_counter()
                dead = sorted(await self._dead_hops(e.index))
                log.info("dead hops %s found in %.0f ms", dead, (time.perf_counter() - t0) * 1e3)
                await self._replace(dead, ban=True, before=position)
        raise AssertionError("unreachable")

    def _deadline(self, tokens: int) -> float:
        """Expected compute + network time of this step, with a wide margin."""
        expected = 0.0
        for h in self.hops:
            expected += (h.hop.end - h.hop.start) * tokens / max(h.info.inference_rps, 1e-3)
            expected += self.rtt.rtt.get(h.hop.peer_id, 0.05)
        return BASE_TIMEOUT + 4 * expected

    async def _step_once(self, msg: Step) -> torch.Tensor:
        step = Step(self._next_step_id(), msg.position, msg.hidden, msg.position_ids, msg.attention_mask)
        send, receive = trio.open_memory_channel(1)
        self._waiting[step.step_id] = send
        timeout = self._deadline(msg.hidden.shape[1])
        try:
            try:
                await wire.write_frame(self.hops[0].session.stream, step.to_wire(self.compression), timeout=timeout)
            except wire.WireError as e:
                raise HopFailed(0, f"cannot send: {e}") from e
            with trio.move_on_after(timeout):
                outcome = await receive.receive()
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome
            raise HopFailed(None, f"no result within {timeout:.1f} s")
        finally:
            self._waiting.pop(step.step_id, None)

    def _next_step_id(self) -> int:
        self._step_ids += 1
        return self._step_ids

    async def _read(self, index_of: Callable[[], int | None], state: HopState) -> None:
        """Frames from one hop: the last hop's results answer steps; errors fail the waiting step."""
        while True:
            try:
                frame = await wire.read_frame(state.session.stream, timeout=24 * 3600)
            except wire.WireError as e:
                self._fail_all(HopFailed(index_of(), f"server {short_id(state.hop.peer_id)} dropped the session: {e}"))
                return
            if isinstance(frame, dict) and "error" in frame:
                err = frame["error"]
                try:
                    wire.raise_if_error(frame)
                except MeshError as e:
                    if e.code == "unavailable":  # a push to the next hop failed: that hop is the broken one
                        failed = next((i for i, h in enumerate(self.hops) if h.hop.peer_id == err.get("peer_id")),
                                      index_of())
                        e = HopFailed(failed, str(e))
                    self._fail(err.get("step_id"), e)
                continue
            kind = frame.get("type") if isinstance(frame, dict) else None
            if kind == History.TYPE:
                waiter = self._history.pop(id(state), None)
                if waiter is not None:
                    waiter.send_nowait(History.from_wire(frame))
                continue
            result = StepResult.from_wire(frame)
            waiter = self._waiting.get(result.step_id)
            if waiter is not None and index_of() == len(self.hops) - 1:
                waiter.send_nowait(result.hidden)

    def _fail(self, step_id: int | None, exc: BaseException) -> None:
        targets = [self._waiting[step_id]] if step_id in self._waiting else list(self._waiting.values())
        for waiter in targets:
            try:
                waiter.send_nowait(exc)
            except trio.WouldBlock:
                pass

    def _fail_all(self, exc: BaseException) -> None:
        self._fail(None, exc)

    # ----- routing and recovery ------------------------------------------------------------------

    async def _plan(self, start: int, end: int, banned: frozenset[str]) -> list[Hop]:
        """A chain for blocks [start, end), waiting up to `route_wait` for servers to appear."""
        deadline = trio.current_time() + self.route_wait
        warned = False
        while True:
            servers = [s for s in self.table.servers(self.model_id) if s.peer_id not in banned and self.accept(s)]
            await self.rtt.measure([s.peer_id for s in servers], only_missing=True)
            try:
                return min_latency_chain(candidates(servers), start, end, self.rtt.rtt, banned=banned)
            except NoRoute:
                missing = self._missing(start, end, banned)
                if trio.current_time() >= deadline:
                    raise RouteUnavailable(
                        f"no server holds blocks {missing} of {self.model_id} (waited {self.route_wait:.0f} s)",
                        hint="start one with `mesh serve`, or wait for the swarm to recover") from None
                if not warned:
                    log.warning("waiting up to %.0f s for a server holding blocks %s", self.route_wait, missing)
                    warned = True
                await trio.sleep(0.5)

    def _missing(self, start: int, end: int, banned: frozenset[str]) -> str:
        counts = self.table.coverage(self.model_id, self.num_blocks,
                                     lambda s: s.peer_id not in banned and self.accept(s))
        return block_ranges([b for b in range(start, end) if counts[b] == 0]) or f"{start}:{end}"

    async def _open_hops(self, route: list[Hop], next_hop: NextHop | None) -> list[HopState]:
        """Sessions for `route`, last first, the last one pushing to `next_hop`."""
        by_id = {s.peer_id: s for s in self.table.all(self.model_id)}
        states: list[HopState] = []
        try:
            for hop in reversed(route):
                info = by_id.get(hop.peer_id)
                if info is None:  # its entry expired while the route was being planned
                    raise OpenFailed(hop.peer_id, f"server {short_id(hop.peer_id)} left the swarm")
                stack = AsyncExitStack()
                states.append(HopState(hop, info, None, stack))  # type: ignore[arg-type]
                try:
                    states[-1].session = await stack.enter_async_context(open_session(
                        self.node, info, hop.start, hop.end, self.max_length, self.batch_size,
                        compression=self.compression, next_hop=next_hop, lora=self.lora))
                except (MeshError, trio.TooSlowError) as e:
                    raise OpenFailed(hop.peer_id, f"cannot open a session on {short_id(hop.peer_id)}: {e}") from e
                next_hop = states[-1].session.as_next_hop()
        except BaseException:
            for st in states:
                await _close_quietly(st.stack)
            raise
        return states[::-1]

    def _start_readers(self, states: list[HopState]) -> None:
        for st in states:
            self.nursery.start_soon(self._reader_task, st)

    async def _reader_task(self, state: HopState) -> None:
        with state.scope:
            await self._read(lambda: self.hops.index(state) if state in self.hops else None, state)

    async def _open_route(self, start: int, end: int, banned: frozenset[str], next_hop: NextHop | None,
                          replay: History | None = None) -> list[HopState]:
        """Plan and open a chain for [start, end); servers that fail to open (or to replay) are banned and
        routed around until the route wait runs out."""
        while True:
            route = await self._plan(start, end, banned)
            try:
                new = await self._open_hops(route, next_hop)
            except OpenFailed as e:
                log.warning("%s; routing around it", e)
                self.bans.ban(e.peer_id)
                banned = banned | {e.peer_id}
                continue
            if replay is None:
                return new
            try:
                await self._replay(new, replay)
                return new
            except (MeshError, trio.TooSlowError) as e:
                bad = {st.hop.peer_id for st in new}
                log.warning("replay on %s failed (%s); trying others", ", ".join(map(short_id, bad)), e)
                for st in new:
                    self.bans.ban(st.hop.peer_id)
                    await _close_quietly(st.stack)
                banned = banned | bad

    async def open(self) -> None:
        self.hops = await self._open_route(0, self.num_blocks, self.bans.banned(), None)
        self._start_readers(self.hops)
        log.info("inference session through %s", self.describe())

    async def _dead_hops(self, hint: int | None) -> set[int]:
        """Which hops are gone: the one a failure names; after a timeout (no name), those that do not
        answer a ping or are no longer ONLINE in the table."""
        if hint is not None:
            return {hint}
        dead: set[int] = set()

        async def check(i: int) -> None:
            peer = self.hops[i].hop.peer_id
            info = self.table.get(peer)
            if info is None or info.state != ServerState.ONLINE:
                dead.add(i)
                return
            try:
                from mesh.net.client import ping

                await ping(self.node, peer, count=1, timeout=2.0)
            except Exception:
                dead.add(i)

        async with trio.open_nursery() as n:
            for i in range(len(self.hops)):
                if i not in dead:
                    n.start_soon(check, i)
        return dead or {len(self.hops) - 1}

    async def _leave_draining(self, position: int) -> None:
        """Move off servers that announced they are going away, before they take a step down with them."""
        leaving = [i for i, h in enumerate(self.hops)
                   if (info := self.table.get(h.hop.peer_id)) is not None and info.state == ServerState.DRAINING]
        if leaving:
            log.info("leaving draining server(s) %s", ", ".join(short_id(self.hops[i].hop.peer_id) for i in leaving))
            await self._replace(leaving, ban=False, before=position)

    async def _replace(self, dead: list[int], *, ban: bool, before: int) -> None:
        """Replace hops `dead` (indices) with new servers whose caches hold positions [0, before)."""
        for i in dead:
            if ban:
                self.bans.ban(self.hops[i].hop.peer_id)
        banned = self.bans.banned() | {self.hops[i].hop.peer_id for i in dead}
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
        new = await self._open_route(start, end, banned, None, replay=history)
        log.info("blocks %d:%d rebuilt on %s: history of %d tokens in %.0f ms, open + replay in %.0f ms",
                 start, end, ", ".join(short_id(st.hop.peer_id) for st in new), history.hidden.shape[1],
                 (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)
        if after is not None:  # the new tail pushes to the hop after the run
            await new[-1].session.relink(after.session.as_next_hop())
        old = self.hops[first:last + 1]
        self.hops[first:last + 1] = new
        if first > 0:
            prev = self.hops[first - 1]
            await prev.session.relink(new[0].session.as_next_hop())
        self._start_readers(new)
        for st in old:
            st.scope.cancel()
            self.nursery.start_soon(_close_quietly, st.stack)

    async def _inputs_of(self, index: int, before: int) -> History:
        """What hop `index` received for positions [0, before): our own steps, or its predecessor's outputs."""
        if index == 0:
            hidden_size = self.inputs[0].hidden.shape[2] if self.inputs else 0
            return concat_steps(self.inputs, before, self.batch_size, hidden_size)
        prev = self.hops[index - 1]
        send, receive = trio.open_memory_channel(1)
        self._history[id(prev)] = send
        with trio.fail_after(30):
            await wire.write_frame(prev.session.stream, HistoryRequest(before).to_wire())
            return await receive.receive()

    async def _replay(self, new: list[HopState], history: History) -> None:
        """Feed the history through the new hops (pushing among themselves) so their caches match."""
        total = history.hidden.shape[1]
        for n, st in enumerate(new[:-1]):
            await st.session.relink(new[n + 1].session.as_next_hop())
        tail = new[-1].session.stream
        for a in range(0, total, REPLAY_CHUNK):
            b = min(total, a + REPLAY_CHUNK)
            step = Step(self._next_step_id(), a, history.hidden[:, a:b], history.position_ids[:, a:b], history.attention_mask[:, a:b],
                        want_output=False)
            timeout = self._deadline(b - a) * (1 + len(new))
            await wire.write_frame(new[0].session.stream, step.to_wire(self.compression), timeout=timeout)
            frame = wire.raise_if_error(await wire.read_frame(tail, timeout=timeout))
            StepResult.from_wire(frame)


async def _close_quietly(stack: AsyncExitStack) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(3):
        try:
            await stack.aclose()
        except Exception:
            pass


@asynccontextmanager
async def open_inference_session(node: Node, table: SwarmTable, rtt: RttTracker, model_id: str,
                                 num_blocks: int, max_length: int, batch_size: int = 1, *,
                                 compression: str = "none", bans: BanList | None = None,
                                 route_wait: float = 30.0, accept: Callable[[ServerInfo], bool] | None = None,
                                 lora: ClientLora | None = None) -> AsyncIterator[InferenceSession]:
    async with trio.open_nursery() as nursery:
        session = InferenceSession(node, table, rtt, bans or BanList(), model_id, num_blocks, max_length,
                                   batch_size, compression, nursery, route_wait, accept, lora)
        try:
            await session.open()
            yield session
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                for st in session.hops:
                    await _close_quietly(st.stack)


