"""Who serves what: ServerInfo announcements, the live swarm table, and how a node learns it.

Why each mechanism:
- **GossipSub** (topic `mesh/<model_id>/servers`) carries every server's signed ServerInfo
  (`net/announce.py`) every few seconds and at once on each state change. It reaches all followers within
  tens of milliseconds, a validator drops what the announced peer did not sign, and a dead server simply
  stops talking, so entries expire on their own (soft state with a TTL).
- **Snapshot** (`/mesh/swarm/1.0.0`): gossip only carries what is said after one subscribes, so a newcomer
  asks any peer for its current table and has it at once instead of after the next round. A snapshot holds
  the entries as their authors signed them, so the peer answering cannot forge or alter one.
- **Kademlia DHT**: servers `provide` the key `mesh-model-<model_id>`. A node whose bootstrap peer does not
  follow that model (a relay, another model's server) finds the model's servers through the DHT, connects
  to one and asks it for the snapshot. The DHT also routes to a peer by id. It is not used for live load
  figures: its records are stale and never checked for liveness.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import trio
from libp2p.peer.id import ID

from ..model.errors import MeshError
from . import wire
from .announce import MAX_RECORD, ServerInfo, ServerState, SignedInfo
from .messages import Snapshot, SnapshotRequest
from .node import Node
from .wire import short_id

__all__ = ["topic", "provider_key", "SwarmTable", "Swarm", "open_swarm",
           "coverage_summary", "block_ranges"]

log = logging.getLogger("mesh.swarm")


def topic(model_id: str) -> str:
    """The gossip topic of a model's announcements."""
    return f"mesh/{model_id}/servers"


def provider_key(model_id: str) -> str:
    """The DHT key under which a model's servers are found."""
    return f"mesh-model-{model_id}"


class SwarmTable:
    """Soft state: each entry lives until `ttl` seconds after this node last heard it; an OFFLINE
    announcement removes it at once.

    Expiry runs on this node's own monotonic clock, never on the announcer's wall clock: peers' clocks
    disagree by seconds or minutes across the internet. An entry learned second-hand (a snapshot) is
    aged by what its sender reports, so it gets no longer a life than the sender would give it. The
    announcer's `timestamp` only orders two announcements of the same server.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._entries: dict[str, ServerInfo] = {}
        self._signed: dict[str, SignedInfo] = {}  # each entry as its author signed it, for snapshots
        self._heard: dict[str, float] = {}  # peer id -> when this node last heard it (self.clock)
        self.changed = trio.Event()

    def update(self, info: ServerInfo, age: float = 0.0, signed: SignedInfo | None = None) -> None:
        """Merge an announcement heard `age` seconds ago (0: just now, from its own author); `signed` is
        how its author signed it (kept for snapshots; entries without one are never passed on)."""
        old = self._entries.get(info.peer_id)
        if old is not None and old.timestamp > info.timestamp:
            return  # a late copy of an older announcement
        if info.state == ServerState.OFFLINE:
            self._entries.pop(info.peer_id, None)
            self._signed.pop(info.peer_id, None)
            self._heard.pop(info.peer_id, None)
        else:
            heard = self.clock() - min(max(age, 0.0), info.ttl)
            if old is not None and old.timestamp == info.timestamp:
                # the same words heard again (a gossip duplicate, a snapshot): they are as old as the
                # first hearing, so a copy never extends their life
                heard = min(heard, self._heard.get(info.peer_id, heard))
            self._entries[info.peer_id] = info
            self._heard[info.peer_id] = heard
            if signed is not None:
                self._signed[info.peer_id] = signed
            else:
                self._signed.pop(info.peer_id, None)
        self._notify()

    def age(self, peer_id: str) -> float:
        """Seconds since this node last heard `peer_id`'s announcement."""
        return self.clock() - self._heard[peer_id]

    def signed(self, peer_id: str) -> SignedInfo | None:
        """The entry of `peer_id` as its author signed it (None for entries made locally, e.g. in tests)."""
        return self._signed.get(peer_id)

    def remove(self, peer_id: str) -> None:
        self._heard.pop(peer_id, None)
        self._signed.pop(peer_id, None)
        if self._entries.pop(peer_id, None) is not None:
            self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def expire(self) -> None:
        now = self.clock()
        for peer, info in list(self._entries.items()):
            silent = now - self._heard[peer]
            if silent > info.ttl:
                log.info("server %s expired (silent for %.0f s)", short_id(peer), silent)
                self.remove(peer)

    def servers(self, model_id: str | None = None, states: tuple[ServerState, ...] = (ServerState.ONLINE,)
                ) -> list[ServerInfo]:
        self.expire()
        out = [i for i in self._entries.values()
               if (model_id is None or i.model_id == model_id) and i.state in states]
        return sorted(out, key=lambda i: (i.model_id, i.start, i.end, i.peer_id))

    def all(self, model_id: str | None = None) -> list[ServerInfo]:
        return self.servers(model_id, states=tuple(ServerState))

    def get(self, peer_id: str) -> ServerInfo | None:
        self.expire()
        return self._entries.get(peer_id)

    def coverage(self, model_id: str, num_blocks: int,
                 accept: Callable[[ServerInfo], bool] | None = None) -> list[int]:
        """How many ONLINE servers (that `accept` admits) hold each block."""
        counts = [0] * num_blocks
        for info in self.servers(model_id):
            if accept is not None and not accept(info):
                continue
            for b in range(max(0, info.start), min(num_blocks, info.end)):
                counts[b] += 1
        return counts

    def block_throughput(self, model_id: str, num_blocks: int) -> list[float]:
        out = [0.0] * num_blocks
        for info in self.servers(model_id):
            for b in range(max(0, info.start), min(num_blocks, info.end)):
                out[b] += info.throughput
        return out


class Swarm:
    """The swarm as one node sees it: follows models' topics into a table, announces, answers snapshots."""

    def __init__(self, node: Node, table: SwarmTable) -> None:
        self.node = node
        self.table = table
        self._followed: set[str] = set()
        self._provided: set[str] = set()

    async def follow(self, model_id: str) -> None:
        if model_id in self._followed:
            return
        self._followed.add(model_id)
        name = topic(model_id)
        self.node.pubsub.set_topic_validator(name, self._relayable, False)
        sub = await self.node.subscribe(name)
        self.node.nursery.start_soon(self._drain, sub, name)

    async def _drain(self, sub, name: str) -> None:
        """Merge announcements as they come (at once: a subscription queue drops past its depth). Each is
        a peer's bytes: one that fails to check is logged with its sender and dropped, never fatal."""
        while True:
            msg = await sub.get()
            sender = _sender(msg)
            try:
                signed, info = SignedInfo.open(msg.data)
                if info.model_id != name.split("/")[1]:
                    raise wire.MalformedFrame(f"announcement of {info.model_id[:40]!r} on {name}")
                self._learn(info, 0.0, signed)
            except MeshError as e:
                log.info("dropped an announcement from %s: %s", sender, e.one_line())
            except Exception as e:  # a bug of ours on a peer's bytes: still only that item is lost
                log.warning("dropped an announcement from %s: %s: %s", sender, type(e).__name__, e)

    def _relayable(self, forwarder: ID, msg) -> bool:
        """Deliver and forward only announcements signed by their announcer, and with an allow-list only
        those its peers announced and forwarded."""
        if not _signed_by_announcer(forwarder, msg):
            return False
        return self.node.allows(forwarder.to_base58()) and self.node.allows(ID(msg.from_id).to_base58())

    def _learn(self, info: ServerInfo, age: float, signed: SignedInfo) -> None:
        if info.peer_id != self.node.peer_id and self.node.allows(info.peer_id):
            self.node.remember(info.peer_id, info.addrs)
            self.table.update(info, age, signed)

    async def announce(self, info: ServerInfo) -> None:
        info.timestamp = time.time()
        info.peer_id = self.node.peer_id
        info.addrs = self.node.join_addrs()
        signed = SignedInfo.sign(info, self.node.host.get_private_key())
        self.table.update(info, 0.0, signed)
        await self.follow(info.model_id)
        try:
            await self.node.pubsub.publish(topic(info.model_id), signed.to_bytes())
        except Exception as e:  # no peers yet, or the router is closing
            log.debug("announce: %s", e)
        if info.state == ServerState.ONLINE and info.model_id not in self._provided:
            self._provided.add(info.model_id)
            self.node.nursery.start_soon(self._provide, info.model_id)

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait (bounded) until queued gossip is written: a goodbye must leave before the host closes."""
        queues = getattr(self.node.pubsub, "peer_queues", {})
        live = set(self.node.host.get_connected_peers())
        with trio.move_on_after(timeout):
            while any(len(q) for peer, q in queues.items() if peer in live):
                await trio.sleep(0.01)
            await trio.sleep(0.05)  # the writer task may still be inside its last write

    async def _provide(self, model_id: str) -> None:
        with trio.move_on_after(20):
            try:
                await self.node.dht.provide(provider_key(model_id))
            except Exception as e:
                log.debug("dht provide: %s", e)

    def serve_snapshots(self) -> None:
        async def handle(stream) -> None:
            req = SnapshotRequest.from_wire(await wire.read_frame(stream, timeout=10, max_size=1 << 12))
            signed = [(s, i) for i in self.table.all(req.model_id or None)
                      if (s := self.table.signed(i.peer_id)) is not None]
            reply = Snapshot([s.to_bytes() for s, _ in signed], [round(self.table.age(i.peer_id), 3) for _, i in signed])
            await wire.write_frame(stream, reply.to_wire())

        self.node.set_handler("swarm", handle)

    async def fetch_snapshot(self, peer_id: str, model_id: str = "", timeout: float = 10.0) -> int:
        """Ask `peer_id` for its table; return how many entries were merged."""
        reply = await self.node.request(peer_id, "swarm", SnapshotRequest(model_id), timeout=timeout,
                                        reply=Snapshot)
        count = 0
        ages = reply.ages if len(reply.ages) == len(reply.servers) else [None] * len(reply.servers)
        for raw, age in zip(reply.servers, ages):
            try:
                signed, info = SignedInfo.open(raw)
            except MeshError as e:
                log.info("dropped a snapshot entry from %s: %s", short_id(peer_id), e.one_line())
                continue
            if not isinstance(age, (int, float)) or isinstance(age, bool) or not math.isfinite(age):
                age = info.ttl / 3  # without the sender's age, assume the worst but one announcement period
            if info.peer_id != self.node.peer_id:
                self._learn(info, age, signed)
                count += 1
        return count

    async def discover(self, model_id: str, timeout: float = 10.0) -> None:
        """Fill the table for `model_id` now: snapshots from connected peers, then the DHT if still empty."""
        await self.follow(model_id)
        with trio.move_on_after(timeout):
            await self.snapshots_from_connected(model_id, timeout)
            if self.table.servers(model_id):
                return
            for info in await self._providers(model_id):
                peer = info.peer_id.to_base58()
                if peer == self.node.peer_id:
                    continue
                try:
                    await self.node.connect(info, timeout=timeout / 2)
                except Exception as e:
                    log.debug("provider %s unreachable: %s", short_id(peer), e)
                    continue
                if await self._try_snapshot(peer, model_id, timeout):
                    return

    async def _providers(self, model_id: str) -> list:
        try:
            found = await self.node.dht.find_providers(provider_key(model_id), count=20)
        except Exception as e:
            log.debug("dht find_providers: %s", e)
            return []
        unique = {p.peer_id.to_base58(): p for p in found}  # the DHT returns duplicates
        return list(unique.values())

    async def snapshots_from_connected(self, model_id: str = "", timeout: float = 10.0) -> dict[str, str]:
        """Ask every connected peer for its table at once (bounded by `timeout`); returns why each peer
        that sent none failed, by peer id."""
        peers = self.node.connected_peers()
        failures = {peer: f"no answer within {timeout:g} s" for peer in peers}

        async def one(peer: str) -> None:
            try:
                await self.fetch_snapshot(peer, model_id, timeout)
            except Exception as e:
                log.debug("snapshot from %s failed: %s", short_id(peer), e)
                failures[peer] = f"{type(e).__name__}: {e}".splitlines()[0]
            else:
                del failures[peer]

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as n:
                for peer in peers:
                    n.start_soon(one, peer)
        return failures

    async def _try_snapshot(self, peer: str, model_id: str, timeout: float) -> int:
        try:
            return await self.fetch_snapshot(peer, model_id, timeout)
        except Exception as e:
            log.debug("snapshot from %s failed: %s", short_id(peer), e)
            return 0

    async def wait_for(self, predicate: Callable[[SwarmTable], bool], timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not predicate(self.table):
                with trio.move_on_after(0.5):  # also re-check for expiry
                    await self.table.changed.wait()
            return True
        return False


def _signed_by_announcer(forwarder: ID, msg) -> bool:
    """Relay only announcements signed by the peer they describe, published by that peer itself."""
    try:
        _, info = SignedInfo.open(msg.data)
        return len(msg.data) <= MAX_RECORD and info.peer_id == ID(msg.from_id).to_base58()
    except Exception:
        return False


def _sender(msg) -> str:
    try:
        return short_id(ID(msg.from_id).to_base58())
    except Exception:
        return "?"


@asynccontextmanager
async def open_swarm(node: Node, follow: list[str] = ()) -> AsyncIterator[Swarm]:
    """The swarm view of a node (gossip, snapshots, DHT), for the block's duration."""
    swarm = Swarm(node, SwarmTable())
    swarm.serve_snapshots()
    for model_id in follow:
        await swarm.follow(model_id)
    yield swarm


def coverage_summary(counts: list[int]) -> str:
    """One line on coverage: every block served (and the fewest servers of any), or which are missing."""
    missing = [i for i, c in enumerate(counts) if c == 0]
    if not missing:
        return f"all {len(counts)} blocks covered (min {min(counts)} servers per block)"
    return f"{len(missing)} of {len(counts)} blocks missing: {block_ranges(missing)}"


def block_ranges(blocks: list[int]) -> str:
    """Sorted block indices as compact ranges ('0:3, 7')."""
    out, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            out.append(f"{start}" if start == b else f"{start}:{b + 1}")
            start = None
    return ", ".join(out)


