"""A client's chain of server sessions: one `HopLink` per hop, and how a chain is planned and opened.

`HopLink` owns one hop's session stream: it sends steps and history requests on it, and its reader task
sorts what comes back (results, history, errors) to its owner. `ChainOpener` plans the fastest chain for a
range of blocks (waiting a while for missing blocks to appear), opens its sessions last first so that each
server can be told the session it pushes to, and, for a replacement, replays the inputs the failed hops
had received, routing around servers that refuse. `net/inference.py` composes these into a session that
survives failures.
"""

from __future__ import annotations

import logging
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from ..balancing.routing import Candidate, Hop, NoRoute, min_latency_chain
from ..model.errors import MeshError
from . import wire
from .adapters import ClientLora
from .client import RemoteSession, open_session
from .latency import RttTracker
from .messages import History, HistoryRequest, NextHop, Step, StepResult
from .node import Node
from .announce import ServerInfo
from .swarm import SwarmTable, block_ranges
from .verify import SpotChecker
from .wire import short_id

__all__ = ["ChainConfig", "HopLink", "ChainOpener", "BanList", "Measured", "RouteUnavailable", "OpenFailed", "candidates",
           "accept_any", "wait_for_route", "REPLAY_CHUNK"]

log = logging.getLogger("mesh.inference")

REPLAY_CHUNK = 512  # tokens per replayed step
USER_ERRORS = ("max_length",)  # error codes that are the client's own fault; any other fails the hop


class RouteUnavailable(MeshError):
    """No chain covers the blocks (after waiting, or after too many failures)."""

    code = "unavailable"


class OpenFailed(MeshError):
    """A server refused or failed to open a session; routing goes around it."""

    code = "unavailable"

    def __init__(self, peer_id: str, message: str) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class BanList:
    """Peers that failed us, each banned for 5 s × 2^(failures − 1), capped at 5 minutes; peers caught
    lying (`convict`) for good."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self.convicted: set[str] = set()

    def convict(self, peer_id: str) -> None:
        self.convicted.add(peer_id)

    def ban(self, peer_id: str) -> None:
        n = self._count.get(peer_id, 0) + 1
        self._count[peer_id] = n
        self._until[peer_id] = self.clock() + min(300.0, 5.0 * 2 ** (n - 1))

    def banned(self) -> frozenset[str]:
        now = self.clock()
        return frozenset(p for p, t in self._until.items() if t > now) | self.convicted


class Measured:
    """How much slower than announced each server answered this client's steps (1: as announced).

    Announced rates are a server's own word; a step's time is the client's own measurement. A chain step
    that takes `r` times what its servers announced counts `r` against each of them (a chain's time cannot
    be split among its hops), smoothed over steps, and routing divides a server's announced rate by its
    factor: a server that claims more than it delivers ranks by what it delivers."""

    SMOOTHING = 0.3

    def __init__(self) -> None:
        self._factor: dict[str, float] = {}

    def factor(self, peer_id: str) -> float:
        return self._factor.get(peer_id, 1.0)

    def record(self, peers: list[str], ratio: float) -> None:
        ratio = max(1.0, ratio)
        for peer in peers:
            self._factor[peer] = (1 - self.SMOOTHING) * self.factor(peer) + self.SMOOTHING * ratio


def candidates(servers: list[ServerInfo], throughput: bool = False, measured: Measured | None = None
               ) -> list[Candidate]:
    """Routing's view of servers: per-block decode rates (latency), or announced throughput (load), each
    divided by how much slower than announced the server has answered this client. A decode rate is also
    divided by the server's load: a step waits for the pass it rides in, and a pass carries about `batch`
    of its `sessions` (the others wait for the next), so with n sessions a step takes 1 + n / batch times
    as long as on an idle server."""
    def rate(s: ServerInfo) -> float:
        load = 1 + s.sessions / max(s.batch, 1.0)
        announced = (s.throughput if throughput else s.inference_rps / load) or 1.0
        return announced / (measured.factor(s.peer_id) if measured is not None else 1.0)

    return [Candidate(s.peer_id, s.start, s.end, rate(s), dict(s.next_pings), s.relayed) for s in servers]


def accept_any(info: ServerInfo) -> bool:
    """The default server filter: every server will do."""
    return True


@dataclass
class ChainConfig:
    """What a client's chains are made of and with: its node and view of the swarm, the model, the
    session sizes, and its choices (compression, which servers it accepts, an adapter)."""

    node: Node
    table: SwarmTable
    rtt: RttTracker
    model_id: str
    num_blocks: int
    max_length: int = 2048  # tokens an inference session's caches hold (training passes hold none)
    batch_size: int = 1
    compression: str = "none"
    bans: BanList = field(default_factory=BanList)
    route_wait: float = 30.0  # how long to wait for a server holding missing blocks
    accept: Callable[[ServerInfo], bool] = accept_any  # e.g. only exact (unquantized) servers
    lora: ClientLora | None = None  # applied by every server of the chain, replacements included
    measured: Measured = field(default_factory=Measured)  # servers' speed as this client saw it
    checker: SpotChecker | None = None  # spot checks of inference steps (net/verify.py)


async def wait_for_route(attempt: Callable[[], Awaitable[list[Hop]]], cfg: ChainConfig,
                         missing: Callable[[NoRoute], str]) -> list[Hop]:
    """`attempt()` until it finds a chain, for up to `cfg.route_wait` s: a server of the missing blocks may
    be joining, or its announcement late on a busy network. `missing` names them for the messages."""
    deadline = trio.current_time() + cfg.route_wait
    warned = False
    while True:
        try:
            return await attempt()
        except NoRoute as e:
            what = missing(e)
            if trio.current_time() >= deadline:
                raise RouteUnavailable(f"no server holds {what} of {cfg.model_id} (waited {cfg.route_wait:.0f} s)",
                                       hint="start one with `mesh serve`, or wait for the swarm to recover") from None
            if not warned:
                log.warning("waiting up to %.0f s for a server holding %s", cfg.route_wait, what)
                warned = True
            await trio.sleep(0.5)


OnResult = Callable[["HopLink", StepResult], None]
OnError = Callable[["HopLink", MeshError, "str | None", "int | None"], None]  # error, failed peer, step id


@dataclass
class HopLink:
    """One hop of a chain: its server's session, the stream it runs on, and the task reading it."""

    hop: Hop
    info: ServerInfo
    session: RemoteSession
    stack: AsyncExitStack  # closes the session
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # the reader task
    _history: trio.MemorySendChannel | None = None
    _history_lock: trio.Lock = field(default_factory=trio.Lock)  # one history request at a time (a spot
    # check and a failover may both ask)

    def as_next_hop(self) -> NextHop:
        return self.session.as_next_hop()

    async def send(self, step: Step, timeout: float) -> None:
        await self.session.send(step, timeout)

    async def history(self, before: int, timeout: float = 30.0, exact: bool = False) -> History:
        """The outputs this hop kept for positions [0, before): the next hop's inputs (`exact`: uncompressed)."""
        with trio.fail_after(timeout):
            async with self._history_lock:
                send, receive = trio.open_memory_channel(1)
                self._history = send
                await wire.write_frame(self.session.stream, HistoryRequest(before, exact).to_wire())
                return await receive.receive()

    async def read(self, on_result: OnResult, on_error: OnError) -> None:
        """Frames from this hop until its stream ends; a broken stream is reported as an error too."""
        with self.scope:
            while True:
                try:
                    frame = await wire.read_frame(self.session.stream, timeout=24 * 3600)
                except wire.WireError as e:
                    on_error(self, MeshError(f"server {short_id(self.hop.peer_id)} dropped the session: {e}"),
                             self.hop.peer_id, None)
                    return
                try:
                    self._dispatch(frame, on_result, on_error)
                except MeshError as e:  # a frame that is not what the protocol says: this hop is broken
                    on_error(self, MeshError(f"server {short_id(self.hop.peer_id)} sent a bad frame: {e}"),
                             self.hop.peer_id, None)
                    return

    def _dispatch(self, frame: object, on_result: OnResult, on_error: OnError) -> None:
        try:
            wire.raise_if_error(frame)
        except MeshError as e:
            step_id = getattr(e, "step_id", None)
            if e.code in USER_ERRORS:  # the request itself is wrong: rerouting would not help
                on_error(self, e, None, step_id)
            else:  # this hop failed, or (unavailable) reports that the hop it pushes to did
                failed = getattr(e, "peer_id", None) if e.code == "unavailable" else None
                on_error(self, e, failed or self.hop.peer_id, step_id)
            return
        if isinstance(frame, dict) and frame.get("type") == History.TYPE:
            waiter, self._history = self._history, None
            if waiter is not None:
                waiter.send_nowait(History.from_wire(frame))
            return
        on_result(self, StepResult.from_wire(frame))

    async def close(self) -> None:
        self.scope.cancel()
        await close_quietly(self.stack)


async def close_quietly(stack: AsyncExitStack) -> None:
    """Close a session's stack whose server may be gone, within a deadline, shielded."""
    with trio.CancelScope(shield=True), trio.move_on_after(3):
        try:
            await stack.aclose()
        except Exception:
            pass


class ChainOpener:
    """Plans and opens chains of sessions for a client (`cfg`)."""

    def __init__(self, cfg: ChainConfig, deadline: Callable[[list[HopLink], int], float],
                 step_id: Callable[[], int]) -> None:
        self.cfg = cfg
        self.deadline = deadline  # seconds a step of n tokens may take through these links
        self.step_id = step_id

    async def plan(self, start: int, end: int, banned: frozenset[str]) -> list[Hop]:
        """A chain for blocks [start, end), waiting up to `route_wait` for servers to appear."""
        cfg = self.cfg

        async def attempt() -> list[Hop]:
            servers = [s for s in cfg.table.servers(cfg.model_id) if s.peer_id not in banned and cfg.accept(s)]
            await cfg.rtt.measure([s.peer_id for s in servers], only_missing=True)
            return min_latency_chain(candidates(servers, measured=cfg.measured), start, end, cfg.rtt.rtt,
                                     banned=banned)

        return await wait_for_route(attempt, cfg, lambda _: f"blocks {self._missing(start, end, banned)}")

    def _missing(self, start: int, end: int, banned: frozenset[str]) -> str:
        cfg = self.cfg
        counts = cfg.table.coverage(cfg.model_id, cfg.num_blocks, lambda s: s.peer_id not in banned and cfg.accept(s))
        return block_ranges([b for b in range(start, end) if counts[b] == 0]) or f"{start}:{end}"

    async def open_hops(self, route: list[Hop], next_hop: NextHop | None, prev: str = "") -> list[HopLink]:
        """Sessions for `route`, last first, the last one pushing to `next_hop`; the first takes pushes
        from `prev` ("": none, the client sends its steps), each other one from the hop before it."""
        cfg = self.cfg
        by_id = {s.peer_id: s for s in cfg.table.all(cfg.model_id)}
        links: list[HopLink] = []
        try:
            for i, hop in reversed(list(enumerate(route))):
                info = by_id.get(hop.peer_id)
                if info is None:  # its entry expired while the route was being planned
                    raise OpenFailed(hop.peer_id, f"server {short_id(hop.peer_id)} left the swarm")
                stack = AsyncExitStack()
                try:
                    session = await stack.enter_async_context(open_session(
                        cfg.node, info, hop.start, hop.end, cfg.max_length, cfg.batch_size,
                        compression=cfg.compression, next_hop=next_hop, lora=cfg.lora,
                        prev=route[i - 1].peer_id if i > 0 else prev))
                except (MeshError, trio.TooSlowError) as e:
                    await close_quietly(stack)
                    raise OpenFailed(hop.peer_id, f"cannot open a session on {short_id(hop.peer_id)}: {e}") from e
                links.append(HopLink(hop, info, session, stack))
                next_hop = session.as_next_hop()
        except BaseException:
            for link in links:
                await close_quietly(link.stack)
            raise
        return links[::-1]

    async def open_route(self, start: int, end: int, banned: frozenset[str], next_hop: NextHop | None,
                         replay: History | None = None, prev: str = "") -> list[HopLink]:
        """Plan and open a chain for [start, end); servers that fail to open (or to replay) are banned and
        routed around until the route wait runs out."""
        while True:
            route = await self.plan(start, end, banned)
            try:
                new = await self.open_hops(route, next_hop, prev)
            except OpenFailed as e:
                log.warning("%s; routing around it", e)
                self.cfg.bans.ban(e.peer_id)
                banned = banned | {e.peer_id}
                continue
            if replay is None:
                return new
            try:
                await self.replay(new, replay)
                return new
            except (MeshError, trio.TooSlowError) as e:
                bad = {link.hop.peer_id for link in new}
                log.warning("replay on %s failed (%s); trying others", ", ".join(map(short_id, bad)), e)
                for link in new:
                    self.cfg.bans.ban(link.hop.peer_id)
                    await close_quietly(link.stack)
                banned = banned | bad

    async def replay(self, new: list[HopLink], history: History) -> None:
        """Feed the history through the new hops (pushing among themselves) so their caches match."""
        total = history.hidden.shape[1]
        for n, link in enumerate(new[:-1]):
            await link.session.relink(new[n + 1].as_next_hop())
        tail = new[-1].session.stream
        for a in range(0, total, REPLAY_CHUNK):
            b = min(total, a + REPLAY_CHUNK)
            step = Step(self.step_id(), a, history.hidden[:, a:b], history.position_ids[:, a:b],
                        history.attention_mask[:, a:b], want_output=False)
            timeout = self.deadline(new, b - a) * (1 + len(new))
            await new[0].send(step, timeout)
            frame = wire.raise_if_error(await wire.read_frame(tail, timeout=timeout))
            StepResult.from_wire(frame)

