"""A mesh server: one span of blocks, its protocol handlers, and its announcements.

Torch work runs in worker threads behind one `CapacityLimiter` (the compute lane), so the event loop
keeps answering pings, gossip and other sessions while a step computes. Each inference session owns a
`SpanCache`; the sum of their `max_length × batch` is bounded by the cache-token budget.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio

from mesh import __version__
from mesh.model.errors import BadRequest
from mesh.model.sources import ModelSource, resolve_model
from mesh.model.quant import bytes_per_block, quantizer
from mesh.model.span import Span, block_params, load_span
from mesh.net import wire
from mesh.net.codec import check_compression
from mesh.net.messages import (BackwardReply, BackwardRequest, ForwardReply, ForwardRequest, InfoReply,
                               InfoRequest, OpenSession, Ping, Pong, SessionOpened, Step)
from mesh.net.node import Node, NodeConfig, open_node, short_id
from mesh.net.latency import RttTracker
from mesh.net.sessions import ServerSession
from mesh.net.swarm import ServerInfo, ServerState, Swarm, open_swarm

log = logging.getLogger("mesh.server")

MAX_BATCH = 64
MAX_NEIGHBOURS = 8
INLINE_TOKENS = 4
WARMUP_TOKENS = 256  # steps of at most this many tokens (batch × length) compute on the event loop


@dataclass
class ServerConfig:
    model: str
    blocks: str = "auto"  # "START:END" or "auto"
    node: NodeConfig = field(default_factory=NodeConfig)
    dtype: torch.dtype = torch.float32
    quant: str = "none"  # "none", "int8" or "nf4": the span's linear layers
    memory_gb: float | None = None  # with --blocks auto: how much memory the blocks may take
    cache_tokens: int = 32768  # sum of max_length × batch over open sessions
    max_length: int = 4096  # longest session a client may open
    public_name: str = ""
    announce_period: float = 5.0
    idle_timeout: float = 300.0  # a session silent this long is closed and its cache freed
    drain_timeout: float = 10.0  # how long a draining server waits for open sessions
    cache_dir: Path | None = None


@dataclass
class Counters:
    sessions_opened: int = 0
    sessions_open: int = 0
    steps_from_clients: int = 0
    steps_from_pushes: int = 0
    pushes_sent: int = 0
    forwards: int = 0
    backwards: int = 0
    errors: int = 0
    busy_refusals: int = 0
    compute_seconds: float = 0.0  # wall time of span computations


class CacheBudget:
    """Cache tokens shared by the sessions; a request that does not fit is refused, never queued."""

    def __init__(self, tokens: int) -> None:
        self.total = tokens
        self.used = 0

    @property
    def free(self) -> int:
        return self.total - self.used

    def reserve(self, tokens: int) -> None:
        if tokens > self.free:
            raise wire.Busy(f"server busy: {tokens} cache tokens requested, {self.free} of {self.total} free",
                            hint="try another server or a shorter max_length")
        self.used += tokens

    def release(self, tokens: int) -> None:
        self.used -= tokens


def parse_blocks(text: str, num_blocks: int) -> tuple[int, int] | None:
    """`START:END` → (start, end); `auto` → None (the caller chooses)."""
    if text.strip().lower() == "auto":
        return None
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise BadRequest(f"--blocks {text!r} is not START:END or auto", hint="e.g. --blocks 0:10") from None
    if not 0 <= a < b <= num_blocks:
        raise BadRequest(f"--blocks {a}:{b} is outside the model's 0:{num_blocks}")
    return a, b


def choose_blocks(source: ModelSource, table_servers: list[ServerInfo], num_blocks: int | None) -> tuple[int, int]:
    """`--blocks auto` before balancing knows better: the first uncovered stretch (or the whole model)."""
    total = source.num_blocks
    covered = [False] * total
    for info in table_servers:
        for b in range(info.start, min(info.end, total)):
            covered[b] = True
    want = num_blocks or total
    start = next((i for i, c in enumerate(covered) if not c), 0)
    return start, min(total, start + want)


def blocks_that_fit(source: ModelSource, quant: str, dtype: torch.dtype, memory_gb: float | None) -> int | None:
    """How many blocks `memory_gb` holds in this quantization (None: no limit given)."""
    if memory_gb is None:
        return None
    linear, other = block_params(source.config)
    per_block = bytes_per_block(linear, other, quant, dtype)
    return max(1, min(source.num_blocks, int(memory_gb * 1e9 // per_block)))


class Server:
    def __init__(self, config: ServerConfig, source: ModelSource, span: Span, node: Node, swarm: Swarm) -> None:
        self.config = config
        self.source = source
        self.span = span
        self.node = node
        self.swarm = swarm
        self.lane = trio.CapacityLimiter(1)
        self.budget = CacheBudget(config.cache_tokens)
        self.counters = Counters()
        self.state = ServerState.JOINING
        self.sessions: dict[str, ServerSession] = {}
        self.throughput = 0.0
        self.inference_rps = 0.0
        self.forward_rps = 0.0
        self._announce_now = trio.Event()
        self.rtt = RttTracker(node)

    # ----- announcements -------------------------------------------------------------------------

    def info(self) -> ServerInfo:
        return ServerInfo(
            peer_id=self.node.peer_id, model_id=self.source.model_id, start=self.span.start, end=self.span.end,
            state=self.state, throughput=self.throughput, inference_rps=self.inference_rps,
            forward_rps=self.forward_rps, cache_tokens_free=self.budget.free,
            dtype=str(self.span.dtype).removeprefix("torch."), quant=self.config.quant, version=__version__,
            public_name=self.config.public_name, total_blocks=self.source.num_blocks,
            next_pings=dict(self.rtt.rtt),
            ttl=max(3.0 * self.config.announce_period, 2.0))

    async def set_state(self, state: ServerState) -> None:
        self.state = state
        log.info("state %s", state.name)
        await self.swarm.announce(self.info())

    async def announce_forever(self) -> None:
        while True:
            with trio.move_on_after(self.config.announce_period):
                await self._announce_now.wait()
            self._announce_now = trio.Event()
            if self.state != ServerState.OFFLINE:
                await self.swarm.announce(self.info())

    async def ping_neighbours(self) -> None:
        """RTT to the servers a chain may continue to from here (those holding our `end` block), announced
        so clients can cost server-to-server links they cannot measure themselves."""
        while True:
            nxt = [i.peer_id for i in self.swarm.table.servers(self.source.model_id)
                   if i.start <= self.span.end < i.end and i.peer_id != self.node.peer_id][:MAX_NEIGHBOURS]
            await self.rtt.measure(nxt)
            for gone in set(self.rtt.rtt) - set(nxt):
                del self.rtt.rtt[gone]
            await trio.sleep(self.config.announce_period)

    async def measure(self) -> None:
        """Per-block throughput from a timed pass, so clients and balancing can compare servers."""
        h = self.span.hidden_size
        span = self.span

        def run() -> tuple[float, float]:
            with torch.no_grad():
                # Warm up at the size of a replay chunk: a first large pass pays allocator and page-fault
                # costs, which would otherwise land on the first client that fails over to us.
                span(torch.randn(1, WARMUP_TOKENS, h), torch.arange(WARMUP_TOKENS)[None])
                x = torch.randn(1, 16, h)
                pos = torch.arange(16)[None]
                span(x, pos)
                t0 = time.perf_counter()
                span(x, pos)
                fwd = time.perf_counter() - t0
                cache = span.new_cache(1, 8)
                span(x[:, :1], pos[:, :1], cache)
                t0 = time.perf_counter()
                span(x[:, :1], pos[:, 1:2], cache)
                step = time.perf_counter() - t0
            return fwd, step

        fwd, step = await trio.to_thread.run_sync(run, limiter=self.lane)
        n = span.num_blocks
        self.forward_rps = 16 / fwd
        self.inference_rps = 1 / step
        self.throughput = n / step  # tokens/s each block of ours sustains in decoding
        log.info("measured: %.1f decode steps/s over %d blocks, %.0f tokens/s in forward passes",
                 self.inference_rps, n, self.forward_rps)

    # ----- handlers ------------------------------------------------------------------------------

    def register(self) -> None:
        self.node.set_handler("inference", self.handle_inference)
        self.node.set_handler("push", self.handle_push)
        self.node.set_handler("forward", self.handle_forward)
        self.node.set_handler("backward", self.handle_backward)
        self.node.set_handler("info", self.handle_info)
        self.node.set_handler("ping", self.handle_ping)

    def _max_numel(self) -> int:
        return self.config.max_length * MAX_BATCH * self.span.hidden_size

    async def _compute(self, fn, *args):
        return await trio.to_thread.run_sync(lambda: fn(*args), limiter=self.lane)

    async def handle_ping(self, stream) -> None:
        while True:  # one stream, many pings: RTT without stream-setup cost
            try:
                frame = await wire.read_frame(stream, timeout=30)
            except wire.StreamClosed:
                return
            ping = Ping.from_wire(frame)
            await wire.write_frame(stream, Pong(ping.nonce).to_wire())

    async def handle_info(self, stream) -> None:
        InfoRequest.from_wire(await wire.read_frame(stream, timeout=10))
        counters = vars(self.counters) | {"cache_tokens_used": self.budget.used}
        await wire.write_frame(stream, InfoReply(self.info().to_wire(), counters).to_wire())

    def _sub_span(self, start: int, end: int) -> Span:
        return self.span.sub(start, end)

    async def handle_forward(self, stream) -> None:
        req = ForwardRequest.from_wire(await wire.read_frame(stream, timeout=60), max_numel=self._max_numel())
        self._check_serving()
        span = self._sub_span(req.start, req.end)
        check_compression(req.compression)
        out = await self._compute(lambda: span(req.hidden, req.position_ids, None, req.attention_mask,
                                               req.prompts).to(req.hidden.dtype))
        self.counters.forwards += 1
        await wire.write_frame(stream, ForwardReply(out).to_wire(req.compression))

    async def handle_backward(self, stream) -> None:
        req = BackwardRequest.from_wire(await wire.read_frame(stream, timeout=60), max_numel=self._max_numel())
        self._check_serving()
        span = self._sub_span(req.start, req.end)
        check_compression(req.compression)
        if req.grad_output.shape != req.hidden.shape:
            raise BadRequest(f"grad_output {list(req.grad_output.shape)} must match hidden {list(req.hidden.shape)}")
        grad, grad_prompts = await self._compute(span.backward, req.hidden, req.grad_output, req.position_ids,
                                                 req.attention_mask, req.prompts)
        self.counters.backwards += 1
        reply = BackwardReply(grad.to(req.hidden.dtype),
                              grad_prompts.to(req.hidden.dtype) if grad_prompts is not None else None)
        await wire.write_frame(stream, reply.to_wire(req.compression))

    def _check_serving(self) -> None:
        if self.state != ServerState.ONLINE:
            raise wire.Unavailable(f"server is {self.state.name}", hint="use another server")

    async def handle_inference(self, stream) -> None:
        opened = OpenSession.from_wire(await wire.read_frame(stream, timeout=30))
        self._check_serving()
        check_compression(opened.compression)
        if not 1 <= opened.batch_size <= MAX_BATCH:
            raise BadRequest(f"batch_size {opened.batch_size} is outside 1..{MAX_BATCH}")
        if not 1 <= opened.max_length <= self.config.max_length:
            raise BadRequest(f"max_length {opened.max_length} is outside 1..{self.config.max_length}")
        span = self._sub_span(opened.start, opened.end)
        tokens = opened.max_length * opened.batch_size
        try:
            self.budget.reserve(tokens)
        except wire.Busy:
            self.counters.busy_refusals += 1
            raise
        self._announce_now.set()
        self.counters.sessions_opened += 1
        self.counters.sessions_open += 1
        peer = short_id(stream.muxed_conn.peer_id.to_base58())
        log.info("session %s from %s: blocks %d:%d, batch %d, max_length %d", opened.session_id[:8], peer,
                 span.start, span.end, opened.batch_size, opened.max_length)
        session = ServerSession(self.node, opened, span, stream, self._step, self.counters,
                                self.config.idle_timeout, self._max_numel())
        try:
            self.sessions[opened.session_id] = session
            await wire.write_frame(stream, SessionOpened(opened.session_id, opened.max_length).to_wire())
            await session.run()
        finally:
            self.sessions.pop(opened.session_id, None)
            self.budget.release(tokens)
            self.counters.sessions_open -= 1
            self._announce_now.set()
            log.info("session %s closed", opened.session_id[:8])

    async def handle_push(self, stream) -> None:
        """Steps pushed by the previous server of a chain, each addressed to one of our sessions."""
        while True:
            try:
                frame = await wire.read_frame(stream, timeout=self.config.idle_timeout + 60)
            except wire.StreamClosed:
                return
            step = Step.from_wire(frame, max_numel=self._max_numel())
            session = self.sessions.get(step.session_id)
            if session is None:
                err = BadRequest(f"no session {step.session_id[:8]} here", hint="it expired or was never opened")
                await wire.write_frame(stream, wire.error_frame(err, step_id=step.step_id))
                continue
            await session.deliver_push(step)

    async def _step(self, span: Span, cache, step: Step) -> torch.Tensor:
        if step.position > cache.length:
            raise BadRequest(f"step expects {step.position} cached tokens but the cache holds {cache.length}",
                             hint="replay the missing tokens")
        if step.position < 0:
            raise BadRequest("negative position")

        def run() -> torch.Tensor:
            t0 = time.perf_counter()
            if cache.length > step.position:
                cache.rollback(step.position)
            with torch.no_grad():
                out = span(step.hidden, step.position_ids, cache, step.attention_mask, step.prompts)
            self.counters.compute_seconds += time.perf_counter() - t0
            return out.to(step.hidden.dtype)

        if step.hidden.shape[0] * step.hidden.shape[1] <= INLINE_TOKENS:
            # A decode step is short: running it on the event loop saves a thread handoff and GIL
            # ping-pong per hop (~1 ms), and delays other tasks by one step at most.
            async with self.lane:
                return run()
        return await trio.to_thread.run_sync(run, limiter=self.lane)

    async def drain(self) -> None:
        """Stop taking sessions, let open ones finish briefly, then say goodbye."""
        await self.set_state(ServerState.DRAINING)
        with trio.move_on_after(self.config.drain_timeout):
            while self.sessions:
                await trio.sleep(0.1)
        for session in list(self.sessions.values()):
            session.cancel()
        await self.set_state(ServerState.OFFLINE)
        await self.swarm.flush()


async def run_server(config: ServerConfig, *, stop: trio.Event | None = None,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Load, join and serve until `stop` is set; then drain and announce OFFLINE before leaving."""
    source = await trio.to_thread.run_sync(lambda: resolve_model(config.model, config.cache_dir))
    fixed = parse_blocks(config.blocks, source.num_blocks)
    async with open_node(config.node) as node, open_swarm(node, follow=[source.model_id]) as swarm:
        if fixed is None:
            await swarm.discover(source.model_id, timeout=5)
            fixed = choose_blocks(source, swarm.table.servers(source.model_id),
                                  blocks_that_fit(source, config.quant, config.dtype, config.memory_gb))
        start, end = fixed
        log.info("loading blocks %d:%d of %s (%s, quantization %s)", start, end, source.name, config.dtype,
                 config.quant)
        t0 = time.perf_counter()
        hook = quantizer(config.quant, config.dtype)
        span = await trio.to_thread.run_sync(
            lambda: load_span(source.path, source.config, start, end, config.dtype, hook))
        log.info("loaded %d blocks in %.1f s", end - start, time.perf_counter() - t0)
        server = Server(config, source, span, node, swarm)
        server.register()
        await server.set_state(ServerState.JOINING)
        await server.measure()
        await server.set_state(ServerState.ONLINE)
        node.nursery.start_soon(server.announce_forever)
        node.nursery.start_soon(server.ping_neighbours)
        task_status.started(server)
        await (stop.wait() if stop is not None else trio.sleep_forever())
        log.info("stopping: draining")
        with trio.move_on_after(config.drain_timeout + 5):
            await server.drain()
