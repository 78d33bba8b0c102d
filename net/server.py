"""A mesh server: one span of blocks, its lifecycle, announcements and rebalancing, and its handlers.

Inference sessions (admission, budget, steps, pushes) live in `net/sessions.py`; all torch work, theirs
and the training calls', goes through the server's one compute lane (`net/lane.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio

from .. import __version__
from ..balancing.placement import (MIN_GAIN, MovePlan, Placed, blocks_for_memory, choose_span, plan_move,
                                   reacts)
from ..balancing.throughput import DEFAULT_BANDWIDTH, Measurement, network_rps, server_throughput
from ..model.errors import BadRequest
from ..model.lora import LoraWeights, load_peft, lora_shapes
from ..model.device import Device
from ..model.measure import (block_bytes, cache_bytes_per_block, cached, default_budget,
                             measure_block, measurement_key, work_bytes)
from ..model.quant import quantizer, resolve_quant
from ..model.sources import ModelSource, cache_root, resolve_model
from ..model.span import Graph, Span, load_span
from . import defaults, wire
from .client import ping, probe_link
from .adapters import AdapterCache
from .codec import check_compression, encode_tensor
from .messages import (BackwardReply, BackwardRequest, ForwardReply, ForwardRequest, InfoReply,
                       InfoRequest, MAX_PROBE, OpenSession, Ping, Pong, Probe, ProbeReply)
from .quotas import Quotas
from .node import Node, NodeConfig, open_node, parse_peer_addr
from .wire import short_id
from .relay import PING_TIMEOUT, establish_reachability, is_circuit
from .latency import RttTracker
from .lane import ComputeLane
from .sessions import Sessions
from .announce import ServerInfo, ServerState
from .swarm import Swarm, open_swarm

__all__ = ["ServerConfig", "TrainingCounters", "parse_blocks", "blocks_that_fit", "measure_link",
           "measure_throughput", "with_quant", "assemble_span", "placed", "KeptGraphs", "Server", "frame_bytes",
           "relay_candidates", "run_server"]

log = logging.getLogger("mesh.server")

MAX_NEIGHBOURS = 8
SMALL_FRAME = 1 << 16  # requests that carry no tensors (ping, info)
MAX_KEPT, KEEP_SECONDS = 32, 120.0  # forward graphs kept for training backwards
REACT_WINDOW = 30.0  # s: a rebalancing check follows a server's departure within U(0, this)
WARMUP_TOKENS = 256  # tokens of the warm-up pass after loading (a replay chunk's order of size)


@dataclass
class ServerConfig:
    """How a server runs (defaults in net/defaults.py, shared with `mesh serve`)."""

    model: str
    blocks: str = defaults.BLOCKS
    node: NodeConfig = field(default_factory=NodeConfig)
    device: Device = field(default_factory=Device.cpu)  # where the span computes, and at which dtype
    quant: str = defaults.QUANT  # "auto" until run_server resolves it
    max_memory_gb: float | None = None  # with --blocks auto: blocks + their cache (None: a share of the
                                        # device's free memory)
    join_delay: float = defaults.JOIN_DELAY
    balance_period: float = defaults.BALANCE_PERIOD
    min_gain: float = MIN_GAIN  # move only if the swarm's bottleneck would rise by more than this fraction
    bandwidth_mbps: float | None = None  # this host's link; None: probed against a peer, else DEFAULT_BANDWIDTH
    remeasure: bool = False  # ignore the cached throughput measurement
    adapters: list[Path] = field(default_factory=list)  # LoRA folders (peft format) served by folder name
    cache_tokens: int = defaults.CACHE_TOKENS
    max_length: int = defaults.MAX_LENGTH
    public_name: str = ""
    announce_period: float = defaults.ANNOUNCE_PERIOD
    idle_timeout: float = defaults.IDLE_TIMEOUT
    drain_timeout: float = 10.0  # how long a draining server waits for open sessions
    cache_dir: Path | None = None
    quotas: Quotas = field(default_factory=Quotas)  # what one peer may take (net/quotas.py)


@dataclass
class TrainingCounters:
    """Training calls a server answered (reported by `info`)."""

    forwards: int = 0
    backwards: int = 0


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


def blocks_that_fit(source: ModelSource, config: "ServerConfig") -> int:
    """How many blocks the memory budget holds: weights at the served width plus each block's share of the
    attention-cache budget, after a reserve for one request's working memory."""
    budget = config.max_memory_gb * 1e9 if config.max_memory_gb is not None else default_budget(config.device)
    dtype = config.device.dtype
    return blocks_for_memory(budget, block_bytes(source.config, config.quant, dtype),
                             cache_bytes_per_block(source.config, config.cache_tokens, dtype, config.max_length),
                             work_bytes(source.config, config.max_length, dtype), source.num_blocks)


def with_quant(source: ModelSource, config: "ServerConfig", fixed: tuple[int, int] | None) -> "ServerConfig":
    """`config` with --quant auto made concrete: quantized only on CUDA, only when the blocks asked for (all
    of them, for --blocks auto) would not fit unquantized."""
    wanted = fixed[1] - fixed[0] if fixed is not None else source.num_blocks
    fits = blocks_that_fit(source, dataclasses.replace(config, quant="none")) >= wanted
    quant = resolve_quant(config.quant, config.device.torch, fits)
    if quant != config.quant:
        log.info("--quant auto: %s on %s", quant, config.device.name)
    return dataclasses.replace(config, quant=quant)


async def measure_link(node: Node) -> float | None:
    """Bits/s to the first connected peer that answers a probe (servers do); None when none does."""
    for peer in node.connected_peers()[:3]:
        try:
            return await probe_link(node, peer)
        except Exception as e:
            log.debug("link probe to %s failed: %s", short_id(peer), e)
    return None


async def measure_throughput(config: "ServerConfig", source: ModelSource, node: Node) -> Measurement:
    """This host's per-block rates for this model (cached, see model/measure.py) and its link's rate:
    `--bandwidth` if given, else a probe to a peer, else DEFAULT_BANDWIDTH."""
    key = measurement_key(source.model_id, config.device, config.quant)

    def run() -> dict:
        log.info("measuring throughput of one block (%s, %s, quantization %s)", config.device.name,
                 config.device.dtype_name, config.quant)
        decode, forward = measure_block(source.config, config.device, config.quant)
        return {"inference_rps": decode, "forward_rps": forward}

    rates, hit = await trio.to_thread.run_sync(
        lambda: cached(cache_root(config.cache_dir), key, run, fresh=config.remeasure))
    if config.bandwidth_mbps is not None:
        bandwidth, how = config.bandwidth_mbps * 1e6, "given"
    elif (probed := await measure_link(node)) is not None:
        bandwidth, how = probed, "probed"
    else:
        bandwidth, how = DEFAULT_BANDWIDTH, "assumed: no peer to probe; pass --bandwidth"
    m = Measurement(rates["inference_rps"], rates["forward_rps"], network_rps(bandwidth, source.config.hidden_size),
                    not how.startswith("assumed"))
    log.info("throughput per block%s: %.0f decode steps/s, %.0f forward tokens/s; link %.0f Mbit/s (%s)",
             " (cached)" if hit else "", m.inference_rps, m.forward_rps, bandwidth / 1e6, how)
    return m


def assemble_span(old: Span | None, src: ModelSource, start: int, end: int, config: ServerConfig) -> Span:
    """Blocks [start, end): layers `old` holds are reused, the rest read from the checkpoint; then one
    warm-up pass at a replay chunk's size, since a first large pass pays allocator and page-fault costs
    that would otherwise land on the first client that fails over to us."""
    device = config.device
    hook = quantizer(config.quant, device.dtype, device.torch)
    layers: list = []
    b = start
    while b < end:
        if old is not None and old.start <= b < old.end:
            stop = min(end, old.end)
            layers += list(old.layers[b - old.start:stop - old.start])
        else:
            stop = min(end, old.start) if old is not None and old.start > b else end
            layers += list(load_span(src.path, src.config, b, stop, device.dtype, hook, src.fetch,
                                     device.torch).layers)
        b = stop
    span = Span(src.config, start, end, layers, device.dtype)
    with torch.no_grad():
        span(torch.randn(1, WARMUP_TOKENS, span.hidden_size), torch.arange(WARMUP_TOKENS)[None])
    device.synchronize()
    return span


def placed(infos: list[ServerInfo]) -> list[Placed]:
    """Routing's and placement's view of servers: where each is and its throughput."""
    return [Placed(i.peer_id, i.start, i.end, i.throughput) for i in infos]


class KeptGraphs:
    """Forward graphs kept for the backward that follows (training): the newest `per_peer` of each peer
    and MAX_KEPT in all, each for KEEP_SECONDS. Keys are (peer, the client's key): one peer never reaches
    another's graphs."""

    def __init__(self, per_peer: int = 4) -> None:
        self.per_peer = per_peer
        self._items: OrderedDict[tuple[str, str], tuple[float, object]] = OrderedDict()

    def put(self, key: tuple[str, str], value: object) -> None:
        self._items[key] = (time.monotonic() + KEEP_SECONDS, value)
        self._items.move_to_end(key)
        mine = [k for k in self._items if k[0] == key[0]]
        for k in mine[:max(0, len(mine) - self.per_peer)]:
            del self._items[k]
        while len(self._items) > MAX_KEPT:
            self._items.popitem(last=False)

    def pop(self, key: tuple[str, str]) -> object | None:
        now = time.monotonic()
        for k in [k for k, (t, _) in self._items.items() if t < now]:
            del self._items[k]
        item = self._items.pop(key, None)
        return item[1] if item is not None else None


def _peer(stream) -> str:
    return stream.muxed_conn.peer_id.to_base58()


class Server:
    """Serves `blocks`; `span` holds their weights once loaded (None while loading the first time)."""

    def __init__(self, config: ServerConfig, source: ModelSource, node: Node, swarm: Swarm,
                 measurement: Measurement, blocks: tuple[int, int], *, movable: bool = False,
                 hosted: dict[str, LoraWeights] | None = None) -> None:
        self.config = config
        self.source = source
        self.blocks = blocks
        self.span: Span | None = None
        self.measurement = measurement
        self.movable = movable  # chosen by --blocks auto: rebalancing may move it
        self.moves = 0
        self.node = node
        self.swarm = swarm
        quotas = config.quotas
        self.lane = ComputeLane(queued_tokens_per_peer=quotas.queued_tokens_per_peer, chunk=quotas.prefill_chunk)
        self.frame_bytes = frame_bytes(quotas, source.config.hidden_size, source.num_blocks)
        self.sessions = Sessions(node, self.lane, config.cache_tokens, config.max_length, config.idle_timeout,
                                 self._max_numel(), quotas, on_change=self.announce_soon, frame_bytes=self.frame_bytes)
        self.training = TrainingCounters()
        self.state = ServerState.JOINING
        self.adapters = AdapterCache(hosted, per_peer=quotas.adapters_per_peer, max_rank=quotas.adapter_rank,
                                     shapes=functools.lru_cache(maxsize=16)(functools.partial(lora_shapes, source.config)),
                                     device=config.device.torch)
        self.graphs = KeptGraphs(quotas.kept_graphs_per_peer)
        self._announce_now = trio.Event()
        self.rtt = RttTracker(node)

    # ----- announcements -------------------------------------------------------------------------

    @property
    def throughput(self) -> float:
        return server_throughput(self.measurement, self.blocks[1] - self.blocks[0], relayed=self.node.relayed)

    def info(self) -> ServerInfo:
        m = self.measurement
        return ServerInfo(
            peer_id=self.node.peer_id, model_id=self.source.model_id, start=self.blocks[0], end=self.blocks[1],
            state=self.state, throughput=self.throughput, inference_rps=m.inference_rps,
            forward_rps=m.forward_rps, network_rps=m.network_rps, cache_tokens_free=self.sessions.budget.free,
            sessions=len(self.sessions), batch=round(self.sessions.batcher.stats.recent, 2),
            dtype=self.config.device.dtype_name, device=self.config.device.name, quant=self.config.quant,
            version=__version__,
            public_name=self.config.public_name, total_blocks=self.source.num_blocks,
            next_pings=dict(self.rtt.rtt), adapters=sorted(self.adapters.hosted), relayed=self.node.relayed,
            ttl=max(3.0 * self.config.announce_period, 2.0))

    async def set_state(self, state: ServerState) -> None:
        self.state = state
        log.info("state %s", state.name)
        await self.swarm.announce(self.info())

    def announce_soon(self) -> None:
        self._announce_now.set()

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
            end = self.blocks[1]
            nxt = [i.peer_id for i in self.swarm.table.servers(self.source.model_id)
                   if i.start <= end < i.end and i.peer_id != self.node.peer_id][:MAX_NEIGHBOURS]
            await self.rtt.measure(nxt)
            for gone in set(self.rtt.rtt) - set(nxt):
                del self.rtt.rtt[gone]
            await trio.sleep(self.config.announce_period)

    async def load(self, start: int, end: int) -> None:
        """Load blocks [start, end) (reusing layers the current span already holds) and warm them up."""
        t0 = time.perf_counter()
        device = self.config.device
        log.info("loading blocks %d:%d of %s (%s, %s, quantization %s)", start, end, self.source.name, device.name,
                 device.dtype_name, self.config.quant)
        self.span = await trio.to_thread.run_sync(assemble_span, self.span, self.source, start, end, self.config)
        log.info("loaded %d blocks in %.1f s", end - start, time.perf_counter() - t0)

    # ----- rebalancing ---------------------------------------------------------------------------

    def plan(self, rng: random.Random) -> MovePlan:
        """Where balancing would put us now (servers ONLINE or JOINING count, at their announced spans)."""
        infos = self.swarm.table.servers(self.source.model_id, states=(ServerState.ONLINE, ServerState.JOINING))
        me = Placed(self.node.peer_id, self.blocks[0], self.blocks[1], self.throughput)
        others = placed([i for i in infos if i.peer_id != self.node.peer_id])
        return plan_move(me, others, self.source.num_blocks, min_gain=self.config.min_gain, rng=rng)

    def _peers(self) -> set[str]:
        states = (ServerState.ONLINE, ServerState.JOINING)
        return {i.peer_id for i in self.swarm.table.servers(self.source.model_id, states=states)}

    async def rebalance_forever(self, rng: random.Random) -> None:
        """Check every U(0, 2 × period) s, and within U(0, REACT_WINDOW) s of a server leaving (its blocks
        may be uncovered now, so waiting for the next periodic check would leave the hole open longer)."""
        period = self.config.balance_period
        deadline = trio.current_time() + rng.uniform(0, 2 * period)
        known = self._peers()
        while True:
            changed = self.swarm.table.changed
            with trio.move_on_at(deadline):
                await changed.wait()
            peers = self._peers()
            if known - peers and reacts(rng, len(peers)):
                deadline = min(deadline, trio.current_time() + rng.uniform(0, min(REACT_WINDOW, 2 * period)))
            known = peers
            if trio.current_time() >= deadline:
                deadline = trio.current_time() + rng.uniform(0, 2 * period)
                try:
                    await self._check(rng)
                except Exception as e:  # the table is peers' words: a bad one costs one check, not the server
                    log.warning("rebalancing check failed: %s: %s", type(e).__name__, e)

    async def _check(self, rng: random.Random) -> None:
        """Move if balancing says so, and still says so a moment later (by then a server that decided at
        the same time has announced its move, and we see it)."""
        if self.state != ServerState.ONLINE:
            return
        plan = self.plan(rng)
        log.debug("rebalancing check: %s", plan.reason)
        if not plan.move:
            return
        await trio.sleep(rng.uniform(0.5, 1.5) * min(1.0, self.config.announce_period))
        again = self.plan(rng)
        if again.move and again.start == plan.start and self.state == ServerState.ONLINE:
            log.info("rebalancing: %s", again.reason)
            await self.move(again.start)

    async def move(self, start: int) -> None:
        """Serve [start, start + n) instead. Announced at once as JOINING there, so clients open no new
        sessions here and other servers plan with our new place; open sessions go on with the old weights.
        The new blocks load beside the old ones when memory allows, else open sessions drain first."""
        old = self.blocks
        end = start + old[1] - old[0]
        self.blocks = (start, end)
        await self.set_state(ServerState.JOINING)
        fresh = sum(1 for b in range(start, end) if not old[0] <= b < old[1])
        need = fresh * block_bytes(self.source.config, self.config.quant, self.config.device.dtype)
        if need > 0.8 * self.config.device.free_memory():
            log.info("not enough free memory to load %d new blocks beside the old ones: draining first", fresh)
            await self.sessions.wait_closed(self.config.drain_timeout)
            self.span = self.span.sub(max(start, old[0]), min(end, old[1])) if fresh < end - start else None
        await self.load(start, end)
        self.moves += 1
        await self.set_state(ServerState.ONLINE)

    # ----- handlers ------------------------------------------------------------------------------

    def register(self) -> None:
        self.node.set_handler("inference", self.handle_inference)
        self.node.set_handler("push", self.sessions.handle_push)
        self.node.set_handler("forward", self.handle_forward)
        self.node.set_handler("backward", self.handle_backward)
        self.node.set_handler("info", self.handle_info)
        self.node.set_handler("ping", self.handle_ping)
        self.node.set_handler("probe", self.handle_probe)

    def _max_numel(self) -> int:
        return self.config.quotas.step_tokens * self.source.config.hidden_size

    async def _read_request(self, stream, kind, timeout: float):
        """A training request, its frame bounded in size and time like a session step's."""
        frame = await self.sessions.read_frame(stream, timeout)
        req = kind.from_wire(frame, max_numel=self._max_numel())
        batch, tokens = req.hidden.shape[:2]
        if batch * tokens > self.config.quotas.step_tokens or tokens > self.config.max_length:
            raise BadRequest(f"{kind.TYPE}.hidden: {batch} × {tokens} tokens; at most {self.config.max_length} per "
                             f"sequence and {self.config.quotas.step_tokens} per request")
        return req

    async def handle_ping(self, stream) -> None:
        while True:  # one stream, many pings: RTT without stream-setup cost
            try:
                frame = await wire.read_frame(stream, timeout=30, max_size=SMALL_FRAME, body_timeout=5)
            except wire.StreamClosed:
                return
            ping = Ping.from_wire(frame)
            await wire.write_frame(stream, Pong(ping.nonce).to_wire())

    async def handle_probe(self, stream) -> None:
        probe = Probe.from_wire(await wire.read_frame(stream, timeout=30, max_size=MAX_PROBE + SMALL_FRAME,
                                                      budget=self.sessions.inflight))
        await wire.write_frame(stream, ProbeReply(bytes(probe.reply_bytes)).to_wire(), timeout=30)

    async def handle_info(self, stream) -> None:
        InfoRequest.from_wire(await wire.read_frame(stream, timeout=10, max_size=SMALL_FRAME))
        counters = (vars(self.sessions.counters) | vars(self.training)
                    | {"compute_seconds": self.lane.seconds, "cache_tokens_used": self.sessions.budget.used})
        await wire.write_frame(stream, InfoReply(self.info().to_wire(), counters, self.sessions.lengths()).to_wire())

    def _sub_span(self, start: int, end: int) -> Span:
        if self.span is None:
            raise wire.Unavailable("server is loading its blocks", hint="use another server")
        return self.span.sub(start, end)

    async def handle_forward(self, stream) -> None:
        req = await self._read_request(stream, ForwardRequest, 60)
        self._check_serving()
        span = self._sub_span(req.start, req.end)
        check_compression(req.compression)
        peer = _peer(stream)
        lora = self.adapters.resolve(req.lora, req.start, req.end, self._max_numel(), peer)
        tokens = req.hidden.shape[0] * req.hidden.shape[1]
        # results come back to the host (where the request was decoded) inside the lane's call, so the wait
        # for a GPU is the lane's
        host, dtype = req.hidden.device, req.hidden.dtype
        if req.keep:
            def forward_keeping() -> tuple[Graph, torch.Tensor]:
                graph = span.forward_with_graph(req.hidden, req.position_ids, req.attention_mask, req.prompts, lora)
                return graph, graph.output.detach().to(host, dtype)

            graph, out = await self.lane.run(forward_keeping, tokens=tokens, peer=peer)
            self.graphs.put((peer, req.keep), (req.start, req.end, graph))
        else:
            out = await self.lane.run(lambda: span(req.hidden, req.position_ids, None, req.attention_mask,
                                                   req.prompts, lora).to(host, dtype), tokens=tokens, peer=peer)
        self.training.forwards += 1
        await wire.write_frame(stream, ForwardReply(out).to_wire(req.compression))

    async def handle_backward(self, stream) -> None:
        req = await self._read_request(stream, BackwardRequest, 60)
        self._check_serving()
        span = self._sub_span(req.start, req.end)
        check_compression(req.compression)
        peer = _peer(stream)
        lora = self.adapters.resolve(req.lora, req.start, req.end, self._max_numel(), peer)
        kept = self.graphs.pop((peer, req.keep)) if req.keep else None
        tokens = req.hidden.shape[0] * req.hidden.shape[1]
        host, dtype = req.hidden.device, req.hidden.dtype
        if kept is not None and kept[:2] == (req.start, req.end) and kept[2].output.shape == req.grad_output.shape:
            grads = await self.lane.run(lambda: kept[2].backward(req.grad_output).to(host, dtype), tokens=tokens,
                                        peer=peer)
        else:  # nothing kept (another server ran the forward, or it expired): recompute it
            grads = await self.lane.run(lambda: span.backward(req.hidden, req.grad_output, req.position_ids,
                                                              req.attention_mask, req.prompts, lora).to(host, dtype),
                                        tokens=tokens, peer=peer)
        self.training.backwards += 1
        reply = BackwardReply(grads.hidden, grads.prompts,
                              [encode_tensor(g) for g in grads.lora] if grads.lora is not None else None)
        await wire.write_frame(stream, reply.to_wire(req.compression))

    def _check_serving(self) -> None:
        if self.state != ServerState.ONLINE:
            raise wire.Unavailable(f"server is {self.state.name}", hint="use another server")

    async def handle_inference(self, stream) -> None:
        opened = OpenSession.from_wire(await self.sessions.read_frame(stream, 30))
        self._check_serving()
        span = self._sub_span(opened.start, opened.end)
        lora = self.adapters.resolve(opened.lora, opened.start, opened.end, self._max_numel(), _peer(stream))
        await self.sessions.serve(stream, opened, span, lora)

    async def drain(self) -> None:
        """Stop taking sessions, let open ones finish briefly, then say goodbye."""
        await self.set_state(ServerState.DRAINING)
        await self.sessions.wait_closed(self.config.drain_timeout)
        await self.set_state(ServerState.OFFLINE)
        await self.swarm.flush()


def frame_bytes(quotas: Quotas, hidden_size: int, num_blocks: int) -> int:
    """The largest frame a server reads: a step's or training call's tensors, or an adapter's weights (up
    to the largest rank, over targets whose features sum to at most 16 × hidden, on every block)."""
    adapter = quotas.adapter_rank * 16 * hidden_size * 4 * num_blocks
    return max(quotas.frame_bytes(hidden_size), adapter + (1 << 20))


def relay_candidates(swarm: Swarm, node_config: NodeConfig) -> list[tuple[str, list[str]]]:
    """Peers that may relay for us, best first: dialable servers we are connected to, then the initial
    peers (we dialled them, so they are dialable), then other dialable servers."""
    connected = set(swarm.node.connected_peers())
    servers = [i for i in swarm.table.servers(states=(ServerState.ONLINE, ServerState.JOINING))
               if not i.relayed and i.addrs]
    random.shuffle(servers)
    out = [(i.peer_id, i.addrs) for i in servers if i.peer_id in connected]
    out += [(parse_peer_addr(a).peer_id.to_base58(), [a]) for a in node_config.initial_peers if not is_circuit(a)]
    out += [(i.peer_id, i.addrs) for i in servers if i.peer_id not in connected]
    unique: dict[str, list[str]] = {}
    for peer, addrs in out:
        unique.setdefault(peer, addrs)
    return list(unique.items())


async def run_server(config: ServerConfig, *, stop: trio.Event | None = None,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Measure, choose blocks, load, join and serve until `stop` is set; then drain and say OFFLINE."""
    source = await trio.to_thread.run_sync(lambda: resolve_model(config.model, config.cache_dir))
    fixed = parse_blocks(config.blocks, source.num_blocks)
    config = with_quant(source, config, fixed)
    rng = random.Random()
    async with open_node(config.node) as node, open_swarm(node, follow=[source.model_id]) as swarm:
        servers: list[Server] = []  # a relay change asks the server (once it exists) to announce at once
        await establish_reachability(node, functools.partial(relay_candidates, swarm, config.node),
                                     lambda: servers and servers[0].announce_soon(),
                                     functools.partial(ping, node, count=1, timeout=PING_TIMEOUT))
        measurement = await measure_throughput(config, source, node)
        if fixed is None:
            length = blocks_that_fit(source, config)
            await trio.sleep(rng.uniform(0, 2 * config.join_delay))
            await swarm.discover(source.model_id, timeout=5)
            others = swarm.table.servers(source.model_id, states=(ServerState.ONLINE, ServerState.JOINING))
            blocks = choose_span(placed(others), length, source.num_blocks)
            log.info("--blocks auto: %d blocks fit; %d:%d is where the swarm is weakest (%d servers known)",
                     length, *blocks, len(others))
        else:
            blocks = fixed
        hosted = {}
        for folder in config.adapters:
            hosted[Path(folder).name] = await trio.to_thread.run_sync(load_peft, Path(folder), source.config)
            log.info("hosting adapter %s", Path(folder).name)
        server = Server(config, source, node, swarm, measurement, blocks, movable=fixed is None, hosted=hosted)
        servers.append(server)
        server.register()
        await server.set_state(ServerState.JOINING)  # before loading: joiners from now on see our place
        node.nursery.start_soon(server.announce_forever)
        await server.load(*blocks)
        await server.set_state(ServerState.ONLINE)
        node.nursery.start_soon(server.ping_neighbours)
        if server.movable and config.balance_period > 0:
            node.nursery.start_soon(server.rebalance_forever, rng)
        task_status.started(server)
        await (stop.wait() if stop is not None else trio.sleep_forever())
        log.info("stopping: draining")
        with trio.move_on_after(config.drain_timeout + 5):
            await server.drain()
