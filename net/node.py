"""The libp2p host of a mesh node, with py-libp2p's traps handled on purpose.

- `ConnectionConfig(max_connections_per_peer=1)`: otherwise every dial waits 250 ms ("happy eyeballs").
- Yamux blocks the 257th concurrent stream to a peer forever: `Node.stream` bounds streams per peer
  with a semaphore well below that and gives every open a deadline.
- Reads have no deadline in libp2p: every frame read goes through `wire.read_frame(timeout=…)`.
- An exception escaping a stream handler ends the whole process: `set_handler` wraps each handler in a
  catch-all that answers with an error frame, resets the stream and logs.
- Yamux sends a window update after every read by default (`PY_YAMUX_RELEASE_ON_READ`): one more
  encrypted write per frame, per hop. `open_node` turns that off, so updates go out at half a window as
  in go-yamux; per-token steps got ~10% faster through 3 servers.
- Leaving `host.run()` leaks connections and tasks: `open_node` always awaits `host.close()`, shielded
  and bounded, before leaving.
- The swarm's dialer skips `/p2p-circuit` addresses: `remember` keeps a relayed peer's addresses aside
  and `stream` dials them through the relay itself (`net/relay.py`), one dial per peer at a time.
- GossipSub defaults drop messages (heartbeat 120 s, 10 msg/s spam limit, IP-diversity rule that refuses
  a mesh of peers on one address, a 32-message subscription queue): we set heartbeat 1 s, turn both
  protections off (messages are signed and validated instead) and subscribe with a deep queue. The
  per-peer outbound queue (32 RPCs) stays: a server publishes one announcement per period.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import multiaddr
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service

from ..model.errors import MeshError
from . import relay, wire
from .wire import short_id
from .allowlist import StrangerGate
from .identity import Identity, open_identity
from .messages import Message
from .peerlimits import PeerLimits, resource_manager
from .ports import claim_ports, port_lock

__all__ = ["DEFAULT_LISTEN", "ENV_INITIAL_PEERS", "MAX_STREAMS_PER_PEER", "PeerUnavailable", "NodeConfig",
           "env_initial_peers", "parse_peer_addr", "Node", "open_node"]

log = logging.getLogger("mesh.node")

DEFAULT_PORT = 31337
DEFAULT_LISTEN = [f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"]
ENV_INITIAL_PEERS = "MESH_INITIAL_PEERS"
MAX_STREAMS_PER_PEER = 128  # Yamux hangs at 256
CLOSE_TIMEOUT = 5.0
SUBSCRIPTION_QUEUE = 4096

Handler = Callable[["trio.abc.Stream"], Awaitable[None]]


class PeerUnavailable(MeshError):
    """A peer cannot be reached, or its stream broke: route around it."""

    code = "unavailable"


@dataclass
class NodeConfig:
    """How a node joins: where it listens, whom it dials first, its identity, its services."""

    listen: list[str] = field(default_factory=lambda: list(DEFAULT_LISTEN))
    initial_peers: list[str] = field(default_factory=list)
    identity_path: Path | None = None  # None: a fresh identity for this run (clients)
    identity_fallback: bool = False  # the default identity: take the next free slot if another process holds it
    listen_fallback: bool = False  # the default port: take the next free one if another process listens there
    dht_mode: str = "server"  # "client" nodes do not answer DHT queries
    connect_timeout: float = 10.0
    gossip_heartbeat: float = 1.0
    relay_service: bool = False  # answer circuit-relay reservations (servers; only useful when dialable)
    peer_limits: PeerLimits = field(default_factory=PeerLimits)  # what one peer may hold (net/peerlimits.py)
    swarm_key: str | None = None  # a private swarm's pre-shared key, 64 hex digits (net/swarmkey.py); None: open
    allow_peers: frozenset[str] | None = None  # serve, relay and gossip with these peers only (net/allowlist.py)


def env_initial_peers() -> list[str]:
    """Initial peers from $MESH_INITIAL_PEERS (whitespace or comma separated)."""
    raw = os.environ.get(ENV_INITIAL_PEERS, "")
    return [p for p in raw.replace(",", " ").split() if p]


def parse_peer_addr(addr: str) -> PeerInfo:
    """A multiaddr ending in /p2p/<peer id> as libp2p's PeerInfo, or a MeshError saying what is expected."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as e:
        raise MeshError(f"bad peer address {addr!r}",
                        hint="expected a multiaddr ending in /p2p/<peer id>, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3…") from e


class Node:
    """A running libp2p host with mesh's protocols, gossip and DHT. Built by `open_node`."""

    def __init__(self, host, pubsub: Pubsub, gossip: GossipSub, dht: KadDHT, config: NodeConfig,
                 nursery: trio.Nursery) -> None:
        self.host = host
        self.pubsub = pubsub
        self.gossip = gossip
        self.dht = dht
        self.config = config
        self.nursery = nursery
        self._stream_slots: dict[str, trio.Semaphore] = defaultdict(lambda: trio.Semaphore(MAX_STREAMS_PER_PEER))
        self._inbound: Counter[str] = Counter()  # peer id -> its streams our handlers are serving
        self._circuits: dict[str, list[str]] = {}  # peer id -> its addresses through relays
        self._dialing: dict[str, trio.Lock] = defaultdict(trio.Lock)
        self.relay_addrs: list[str] | None = None  # set while this node is only reachable through a relay
        self.observed_addrs: list[str] = []  # dialable addresses that peers' dial-backs confirmed

    def allows(self, peer_id: str) -> bool:
        """Whether this node deals with `peer_id` (always, without an allow-list)."""
        return self.config.allow_peers is None or peer_id in self.config.allow_peers

    @property
    def relayed(self) -> bool:
        return self.relay_addrs is not None

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs others can dial, with /p2p/<id>."""
        out = []
        for a in self.host.get_addrs():
            text = str(a)
            if "/p2p/" not in text:
                text = f"{text}/p2p/{self.peer_id}"
            out.append(text)
        return out

    def join_addrs(self) -> list[str]:
        """Addresses to share: wildcard listen addresses replaced by this machine's interface addresses,
        or, while this node cannot be dialled, only its addresses through its relay."""
        if self.relay_addrs is not None:
            return list(self.relay_addrs)
        out = [f"{a}/p2p/{self.peer_id}" for a in self.observed_addrs]
        for a in self.addrs:
            if "/ip4/0.0.0.0/" in a:
                out.extend(a.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/") for ip in _local_ipv4s())
            else:
                out.append(a)
        return list(dict.fromkeys(out))

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers()]

    async def subscribe(self, topic: str, queue: int = SUBSCRIPTION_QUEUE):
        """Subscribe with a deep queue: libp2p's 32-message queue drops bursts silently."""
        sub = await self.pubsub.subscribe(topic)
        send, receive = trio.open_memory_channel(queue)
        self.pubsub.subscribed_topics_send[topic] = send
        sub.receive_channel = receive
        return sub

    def set_handler(self, name: str, handler: Handler) -> None:
        """Serve `/mesh/<name>/<version>`; the handler can never take the node down."""
        proto = TProtocol(wire.protocol_id(name))

        async def guarded(stream) -> None:
            peer_id = stream.muxed_conn.peer_id.to_base58()
            peer = short_id(peer_id)
            if not self.allows(peer_id):  # a typed refusal; StrangerGate closes the connection
                log.info("%s: refused %s, not on the allow-list", name, peer)
                refusal = wire.NotAllowed("this server serves only the peers on its allow-list",
                                          hint="ask its operator to add your peer id")
                with trio.move_on_after(1.0):
                    await wire.write_frame(stream, wire.error_frame(refusal, peer_id=self.peer_id))
                await wire.close_quietly(stream)
                return
            if self._inbound[peer_id] >= self.config.peer_limits.streams_per_peer:
                log.debug("%s: %s has %d streams open; refusing another", name, peer, self._inbound[peer_id])
                await wire.reset_quietly(stream)
                return
            self._inbound[peer_id] += 1
            try:
                await handler(stream)
            except wire.StreamClosed:
                log.debug("%s: %s closed the stream", name, peer)
            except Exception as e:
                log.warning("%s: request from %s failed: %s", name, peer, _one_line(e))
                try:  # answer with the error, then close (a reset could overtake the answer)
                    await wire.write_frame(stream, wire.error_frame(e), timeout=1.0)
                except Exception:
                    await wire.reset_quietly(stream)
                    return
            finally:
                self._inbound[peer_id] -= 1
                if not self._inbound[peer_id]:
                    del self._inbound[peer_id]
            await wire.close_quietly(stream)

        self.host.set_stream_handler(proto, guarded)

    async def connect(self, addr: str | PeerInfo, *, timeout: float | None = None) -> str:
        info = parse_peer_addr(addr) if isinstance(addr, str) else addr
        circuit = isinstance(addr, str) and relay.is_circuit(addr)  # a relayed server's printed address
        if circuit:
            self.remember(info.peer_id.to_base58(), [addr])
        try:
            with trio.fail_after(timeout or self.config.connect_timeout):
                if circuit:
                    await self._dial_circuit_if_needed(info.peer_id.to_base58())
                else:
                    await self.host.connect(info)
        except trio.TooSlowError as e:
            raise PeerUnavailable(f"no connection to {short_id(info.peer_id.to_base58())} within "
                                  f"{timeout or self.config.connect_timeout:.0f} s") from e
        except MeshError:
            raise
        except Exception as e:
            raise PeerUnavailable(f"cannot reach {short_id(info.peer_id.to_base58())}: {_one_line(e)}") from e
        return info.peer_id.to_base58()

    def remember(self, peer_id: str, addrs: list[str]) -> None:
        """Put a peer's announced addresses in the peerstore so streams to it can dial; addresses through
        a relay are kept aside (libp2p's dialer skips them) for `stream` to dial itself."""
        maddrs = []
        circuits = [a for a in addrs if relay.is_circuit(a)]
        if circuits:
            self._circuits[peer_id] = circuits
        elif addrs:
            self._circuits.pop(peer_id, None)
        for a in addrs:
            if relay.is_circuit(a):
                continue
            try:
                maddrs.append(multiaddr.Multiaddr(a.split("/p2p/")[0]))
            except Exception:
                continue
        if maddrs:
            self.host.get_peerstore().add_addrs(ID.from_base58(peer_id), maddrs, 3600)

    @asynccontextmanager
    async def stream(self, peer_id: str, name: str, *, timeout: float = 10.0,
                     version: str = wire.PROTOCOL_VERSION) -> AsyncIterator[object]:
        """An outgoing stream speaking `/mesh/<name>/…`, bounded per peer, closed on exit."""
        slots = self._stream_slots[peer_id]
        try:
            with trio.fail_after(timeout):
                await slots.acquire()
        except trio.TooSlowError as e:
            raise PeerUnavailable(f"too many open streams to {short_id(peer_id)}") from e
        try:
            try:
                with trio.fail_after(timeout):
                    await self._dial_circuit_if_needed(peer_id)
                    stream = await self.host.new_stream(ID.from_base58(peer_id),
                                                        [TProtocol(wire.protocol_id(name, version))])
            except trio.TooSlowError as e:
                raise PeerUnavailable(f"{short_id(peer_id)} did not open a {name} stream within {timeout:.0f} s") from e
            except MeshError:
                raise
            except Exception as e:
                text = _one_line(e)
                if _protocol_refused(e):
                    raise wire.UnknownVersion(f"{short_id(peer_id)} does not speak {wire.protocol_id(name, version)}",
                                              hint="the peer runs an incompatible mesh version") from e
                raise PeerUnavailable(f"cannot open a {name} stream to {short_id(peer_id)}: {text}") from e
            ok = False
            try:
                yield stream
                ok = True
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await (wire.close_quietly(stream) if ok else wire.reset_quietly(stream))
        finally:
            slots.release()

    async def _dial_circuit_if_needed(self, peer_id: str) -> None:
        """Peers that announced only relay addresses are dialled through a relay, one dial at a time."""
        if peer_id not in self._circuits:
            return
        async with self._dialing[peer_id]:
            if self.host.get_network().connections.get(ID.from_base58(peer_id)):
                return
            errors = []
            for addr in self._circuits.get(peer_id, []):
                try:
                    await relay.dial_circuit(self.host, addr)
                    log.debug("connected to %s through %s", short_id(peer_id), addr.split(relay.CIRCUIT)[0])
                    return
                except Exception as e:
                    errors.append(_one_line(e))
            raise PeerUnavailable(f"cannot reach {short_id(peer_id)} through its relays: {'; '.join(errors)}")

    async def request(self, peer_id: str, name: str, message: Message, *, timeout: float = 30.0,
                      compression: str = "none", reply: type[Message] = Message) -> Message:
        """One frame out, one frame back, on a fresh stream, within `timeout`."""
        with trio.fail_after(timeout + 1.0):
            async with self.stream(peer_id, name, timeout=timeout) as s:
                await wire.write_frame(s, message.to_wire(compression), timeout=timeout)
                frame = await wire.read_frame(s, timeout=timeout)
        wire.raise_if_error(frame)
        try:
            return reply.from_wire(frame)
        except MeshError as e:  # the peer answered, but not with what the protocol says: it failed
            raise PeerUnavailable(f"{short_id(peer_id)} sent a malformed {name} reply: {e}") from e


@asynccontextmanager
async def open_node(config: NodeConfig) -> AsyncIterator[Node]:
    """Start a host with gossip and DHT, connect to the initial peers, and always close cleanly."""
    for addr in config.initial_peers:
        parse_peer_addr(addr)  # bad input fails before anything starts
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")  # read by py-libp2p's Yamux on every read
    identity = open_identity(config.identity_path, fallback=config.identity_fallback)
    try:
        async with _open_host(config, identity) as node:
            yield node
    finally:
        identity.release()


@asynccontextmanager
async def _listening(host, config: NodeConfig) -> AsyncIterator[None]:
    """`host.run()` on ports no other process here listens on (see net/ports.py)."""
    if all(a.endswith("/tcp/0") for a in config.listen):
        async with host.run(listen_addrs=[multiaddr.Multiaddr(a) for a in config.listen]):
            yield
        return
    async with AsyncExitStack() as stack:
        async with port_lock():
            listen = claim_ports(config.listen, fallback=config.listen_fallback)
            if listen != config.listen:
                log.warning("port %s is in use by another process here; listening on %s instead",
                            config.listen[0].rsplit("/", 1)[1], listen[0])
            await stack.enter_async_context(host.run(listen_addrs=[multiaddr.Multiaddr(a) for a in listen]))
        yield


def _guard_gossip_streams(host, pubsub: Pubsub) -> None:
    """py-libp2p's gossip handler lets a malformed RPC (a protobuf DecodeError) escape, which stops the
    whole swarm service: one peer's bad bytes would cut this node off. Such a stream is reset instead."""
    async def guarded(stream) -> None:
        try:
            await pubsub.stream_handler(stream)
        except Exception as e:
            log.info("gossip stream from %s dropped: %s", short_id(stream.muxed_conn.peer_id.to_base58()),
                     _one_line(e))
            await wire.reset_quietly(stream)

    for protocol in (PROTOCOL_ID_V11, PROTOCOL_ID):
        host.set_stream_handler(protocol, guarded)


@asynccontextmanager
async def _open_host(config: NodeConfig, identity: Identity) -> AsyncIterator[Node]:
    key_pair = identity.key_pair
    host = new_host(key_pair=key_pair, muxer_preference="YAMUX", psk=config.swarm_key,
                    connection_config=ConnectionConfig(max_connections_per_peer=1),
                    resource_manager=resource_manager(config.peer_limits))
    gossip = GossipSub(protocols=[PROTOCOL_ID_V11, PROTOCOL_ID], degree=6, degree_low=4, degree_high=12,
                       heartbeat_interval=config.gossip_heartbeat, heartbeat_initial_delay=0.1,
                       spam_protection_enabled=False, eclipse_protection_enabled=False)
    pubsub = Pubsub(host, gossip)
    _guard_gossip_streams(host, pubsub)
    dht = KadDHT(host, DHTMode.SERVER if config.dht_mode == "server" else DHTMode.CLIENT)
    join_error: MeshError | None = None
    async with trio.open_nursery() as nursery:
        try:
            async with AsyncExitStack() as stack:
                await stack.enter_async_context(_listening(host, config))
                await stack.enter_async_context(background_trio_service(pubsub))
                await stack.enter_async_context(background_trio_service(gossip))
                await stack.enter_async_context(background_trio_service(dht))
                if config.allow_peers is not None:
                    host.get_network().register_notifee(StrangerGate(host, config.allow_peers, nursery))
                relaying = relay.GuardedRelay(host, relay.RELAY_LIMITS, allow_hop=config.relay_service,
                                              allowed=config.allow_peers)
                await stack.enter_async_context(background_trio_service(relaying))  # STOP: accept relayed conns
                await stack.enter_async_context(background_trio_service(DCUtRProtocol(host)))
                with trio.fail_after(10):
                    await pubsub.wait_until_ready()
                node = Node(host, pubsub, gossip, dht, config, nursery)
                relay.serve_dialback(node)
                log.info("node %s listening on %s", short_id(node.peer_id), ", ".join(node.addrs))
                if identity.path is not None and config.identity_path is not None \
                        and identity.path != Path(config.identity_path).expanduser():
                    log.warning("%s is in use by another mesh process here; running as %s instead",
                                config.identity_path, identity.path)
                try:
                    await _join(node, config.initial_peers)
                except MeshError as e:  # raised below, outside the nursery, so callers see it unwrapped
                    join_error = e
                else:
                    try:
                        yield node
                    finally:
                        await _close_host(host)  # inside run(): leaving run() alone leaks connections
        finally:
            nursery.cancel_scope.cancel()
            await _close_host(host)
    if join_error is not None:
        raise join_error


async def _close_host(host) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        await host.close()  # idempotent


async def _join(node: Node, peers: list[str]) -> None:
    if not peers:
        return
    reached: list[str] = []

    async def one(addr: str) -> None:
        try:
            reached.append(await node.connect(addr))
        except PeerUnavailable as e:
            log.warning("initial peer %s unreachable: %s", addr, e.one_line())

    async with trio.open_nursery() as n:
        for addr in peers:
            n.start_soon(one, addr)
    if not reached:
        key = ("and that they hold this node's --swarm-key" if node.config.swarm_key is not None
               else "and, for a private swarm, pass its --swarm-key")
        raise PeerUnavailable(f"none of the {len(peers)} initial peers answered",
                              hint=f"check the addresses (mesh serve prints them), that the peers are up {key}")
    for peer in reached:
        with trio.move_on_after(2.0):
            try:
                await node.dht.add_peer(ID.from_base58(peer))
            except Exception as e:  # the DHT is a supplement; a peer without it is still usable
                log.debug("dht add_peer %s: %s", short_id(peer), _one_line(e))
    log.info("joined the swarm through %d of %d initial peers", len(reached), len(peers))


def _protocol_refused(e: BaseException | None) -> bool:
    """multistream-select answered "na": the peer is up but does not speak this protocol id."""
    while e is not None:
        if "protocols not supported" in str(e) or "protocol not supported" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _local_ipv4s() -> list[str]:
    """IPv4 addresses of this machine's interfaces (Linux: every interface that is up; elsewhere: the one
    that routes outwards), always with loopback."""
    import socket

    ips = {"127.0.0.1"}
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue  # no IPv4 address on it
                ips.add(socket.inet_ntoa(raw[20:24]))
    except (ImportError, OSError):
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ips.add(s.getsockname()[0])
    except OSError:
        pass
    return sorted(ips)
