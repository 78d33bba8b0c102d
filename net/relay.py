"""Reaching nodes that cannot be dialled: a dial-back check, circuit relay v2 slots, dials through them.

A server behind a home router can dial out but nobody can dial in. It learns that by asking up to three
connected peers to dial it back (`/mesh/dialback/…`): each peer opens a plain TCP connection to the
asker's *observed* address (the one the peer sees the request come from) at each port the asker
listens on. One success means dialable; answers and no success mean not. The peer only ever dials the
address the request came from, so the protocol cannot be used to make it scan someone else.

A node that is not dialable reserves a slot on a relay (circuit relay v2, `/libp2p/circuit/relay/0.2.0/hop`)
among the dialable peers it is connected to, and announces only `<relay addr>/p2p-circuit/p2p/<self>`
addresses. Dialers reach it by asking the relay to CONNECT them (the relay opens a STOP stream to the
reserved peer and pipes bytes); the result is upgraded like any connection (Noise, Yamux), so every
mesh protocol runs over it unchanged. `RelaySlot` keeps the reservation: it watches the relay every
second and refreshes before expiry; when the relay goes, it reserves on another one and asks for an
announcement at once.

Every serving node that finds itself dialable relays for others, within `RELAY_LIMITS`, through
`GuardedRelay`: a reservation is only ever for the connection's own peer (py-libp2p's relay would reserve
for any peer id the RESERVE names, so one peer could fill every slot), one per peer and `MAX_RESERVATIONS`
in all, and it lasts `RESERVATION_TTL` unless its holder renews it, so a slot left behind frees soon.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from . import wire
from .wire import short_id
from .messages import Message

__all__ = ["CIRCUIT", "PING_TIMEOUT", "RELAY_LIMITS", "MAX_RESERVATIONS", "RESERVATION_TTL", "GuardedRelay",
           "is_circuit", "circuit_addrs", "split_circuit",
           "is_relayed", "RelayRefused", "dial_circuit", "reserve", "DialBack", "DialBackReply",
           "serve_dialback", "listen_ports", "check_dialable", "RelayState", "RelayHost", "RelaySlot",
           "establish_reachability"]

log = logging.getLogger("mesh.relay")

CIRCUIT = "/p2p-circuit"
DIALBACK_TIMEOUT = 3.0  # a dialable host answers a TCP SYN within one RTT
DIALBACK_PEERS = 3
WATCH_PERIOD = 1.0
PING_PERIOD = 2.0  # a relay that vanishes silently (no FIN, no RST) is noticed after MISSED_PINGS pings
PING_TIMEOUT = 3.0  # generous: pings share the relay connection with the relayed tensors
MISSED_PINGS = 2
SILENCE = MISSED_PINGS * PING_PERIOD + PING_TIMEOUT  # s without an answer after which the relay counts as gone
MAX_RESERVATIONS = 64  # slots a relay gives in all (one per peer)
RESERVATION_TTL = 120  # seconds a slot lasts unless its holder renews it
RENEW_BEFORE = RESERVATION_TTL / 2  # a holder renews when less than this is left (RelaySlot.run)
RELAY_LIMITS = RelayLimits(duration=7 * 24 * 3600, data=1 << 50, max_circuit_conns=256,
                           max_reservations=MAX_RESERVATIONS, reservation_ttl=RESERVATION_TTL)


def is_circuit(addr: str) -> bool:
    """Whether a multiaddr goes through a relay (/p2p-circuit)."""
    return CIRCUIT in addr


def circuit_addrs(relay_addrs: list[str], relay_id: str, peer_id: str) -> list[str]:
    """Addresses of `peer_id` through the relay: `<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>`."""
    out = []
    for a in relay_addrs:
        if is_circuit(a):
            continue
        base = a if "/p2p/" in a else f"{a}/p2p/{relay_id}"
        out.append(f"{base}{CIRCUIT}/p2p/{peer_id}")
    return out


def split_circuit(addr: str) -> tuple[str, str]:
    """(`<relay addr>/p2p/<relay>`, target peer id) of a circuit address."""
    relay, _, target = addr.partition(f"{CIRCUIT}/p2p/")
    if not relay or not target:
        raise ValueError(f"not a circuit address: {addr}")
    return relay, target


def is_relayed(conn) -> bool:
    """Whether a libp2p connection runs through a relay."""
    try:
        return any(is_circuit(str(a)) for a in conn.get_transport_addresses())
    except Exception:
        return False


class RelayRefused(Exception):
    """A relay answered a reservation or a connect with an error status."""

    pass


async def _hop(host, relay_id: ID, msg: HopMessage):
    stream = await host.new_stream(relay_id, [HOP_PROTOCOL])
    try:
        await write_delimited_msg(stream, msg)
        reply = await read_delimited_msg(stream, HopMessage)
    except BaseException:
        await wire.reset_quietly(stream)
        raise
    status = reply.status if reply.HasField("status") else StatusCode.OK
    if status != StatusCode.OK:
        await wire.reset_quietly(stream)
        name = StatusCode(status).name if status in StatusCode._value2member_map_ else str(status)
        raise RelayRefused(f"relay {short_id(str(relay_id))} answered {name}")
    return stream, reply


async def dial_circuit(host, addr: str) -> None:
    """Connect to the target of a circuit address through its relay; the connection joins the swarm."""
    relay_addr, target = split_circuit(addr)
    relay = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
    target_id = ID.from_base58(target)
    await host.connect(relay)
    stream, _ = await _hop(host, relay.peer_id, HopMessage(type=HopMessage.CONNECT,
                                                           peer=PeerId(id=target_id.to_bytes())))
    raw = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED,
                        addresses=[multiaddr.Multiaddr(f"/p2p/{relay.peer_id.to_base58()}{CIRCUIT}/p2p/{target}")])
    await host.upgrade_outbound_connection(raw, target_id)


async def reserve(host, relay_id: ID) -> float:
    """Reserve a slot on a connected relay; returns when it expires (unix time)."""
    stream, reply = await _hop(host, relay_id, HopMessage(type=HopMessage.RESERVE,
                                                          peer=PeerId(id=host.get_id().to_bytes())))
    await wire.close_quietly(stream)
    expire = reply.reservation.expire if reply.HasField("reservation") else 0
    return float(expire) if expire else time.time() + RESERVATION_TTL


# ----- relaying for others -----------------------------------------------------------------------------


class GuardedRelay(CircuitV2Protocol):
    """py-libp2p's circuit relay v2, reserving only for the peer at the other end of the connection.

    The parent reserves for whatever peer id a RESERVE names; here that field is dropped, so the parent
    falls back to `stream.muxed_conn.peer_id`. Its resource manager keys slots by peer id (one per peer;
    a re-reserve refreshes it) and caps them at `limits.max_reservations`. Before each reservation,
    slots that expired or whose holder is no longer connected (the spec's condition for a valid slot)
    are freed, so only live peers count against the cap.
    """

    def __init__(self, host: Any, limits: RelayLimits = RELAY_LIMITS, allow_hop: bool = False,
                 allowed: frozenset[str] | None = None, **kwargs: Any) -> None:
        super().__init__(host, limits, allow_hop=allow_hop, **kwargs)
        self.allowed = allowed  # with an allow-list, only its peers get slots

    def _free_stale(self) -> None:
        rm = self.resource_manager
        now = time.time()
        connections = getattr(self.host.get_network(), "connections", None)
        for peer_id, res in list(rm._reservations.items()):
            if now > res.expires_at or (connections is not None and not connections.get(peer_id)):
                del rm._reservations[peer_id]

    async def _handle_reserve(self, stream: Any, msg: HopMessage) -> None:
        """Reserve (or refresh) a slot for the stream's remote peer, whatever peer the message names."""
        msg.ClearField("peer")
        self._free_stale()
        if self.allowed is not None and stream.muxed_conn.peer_id.to_base58() not in self.allowed:
            await stream.reset()
            return
        await super()._handle_reserve(stream, msg)


# ----- dial-back ---------------------------------------------------------------------------------------


@dataclass
class DialBack(Message):
    """Ask a peer to dial us back on these ports (are we reachable?)."""

    ports: list = field(default_factory=list)


@dataclass
class DialBackReply(Message):
    """Which of our addresses the peer could dial."""

    dialable: list = field(default_factory=list)  # "/ip4/<observed ip>/tcp/<port>" that accepted


def serve_dialback(node: RelayHost) -> None:
    """Answer other nodes' dial-back requests."""
    async def handle(stream) -> None:
        req = DialBack.from_wire(await wire.read_frame(stream, timeout=10))
        remote = stream.muxed_conn.get_remote_address() if not is_relayed(stream.muxed_conn) else None
        dialable = []
        if remote:
            ip = remote[0]
            for port in [p for p in req.ports if isinstance(p, int) and 0 < p < 65536][:4]:
                with trio.move_on_after(DIALBACK_TIMEOUT):
                    try:
                        sock = await trio.open_tcp_stream(ip, port)
                    except OSError:
                        continue
                    await sock.aclose()
                    dialable.append(f"/ip4/{ip}/tcp/{port}")
        await wire.write_frame(stream, DialBackReply(dialable).to_wire())

    node.set_handler("dialback", handle)


def listen_ports(node: RelayHost) -> list[int]:
    """The TCP ports this node listens on (what a dial-back should try)."""
    ports = set()
    for a in node.host.get_addrs():
        try:
            ports.add(int(multiaddr.Multiaddr(str(a)).value_for_protocol("tcp")))
        except Exception:
            continue
    return sorted(ports)


async def check_dialable(node: RelayHost, peers: list[str]) -> tuple[bool | None, list[str]]:
    """Ask up to three `peers` to dial us back: (dialable?, addresses that worked); None: nobody answered."""
    ports = listen_ports(node)
    answers: list[list[str]] = []

    async def ask(peer: str) -> None:
        try:
            reply = await node.request(peer, "dialback", DialBack(ports), timeout=DIALBACK_TIMEOUT + 5,
                                       reply=DialBackReply)
        except Exception as e:
            log.debug("dial-back through %s: %s", short_id(peer), e)
            return
        answers.append([a for a in reply.dialable if isinstance(a, str)])

    async with trio.open_nursery() as n:
        for peer in peers[:DIALBACK_PEERS]:
            n.start_soon(ask, peer)
    if not answers:
        return None, []
    worked = sorted({a for answer in answers for a in answer})
    return bool(worked), worked


# ----- keeping a relay slot ----------------------------------------------------------------------------


@dataclass
class RelayState:
    """The relay slot held now: which relay, our addresses through it, when it expires."""

    relay_id: str = ""
    addrs: list[str] = field(default_factory=list)  # our circuit addresses through it
    expire: float = 0.0  # unix time, as the relay set it


class RelayHost(Protocol):
    """What this module needs of a node. `net/node.py`'s Node is one; the node imports this module, so
    this module names the interface instead of importing the node back."""

    host: Any  # the libp2p host
    nursery: trio.Nursery
    peer_id: str
    relay_addrs: list[str] | None
    observed_addrs: list[str]

    def connected_peers(self) -> list[str]: ...

    def set_handler(self, name: str, handler: Callable[[Any], Awaitable[None]]) -> None: ...

    async def connect(self, addr: str | PeerInfo, *, timeout: float | None = None) -> str: ...

    async def request(self, peer_id: str, name: str, message: Message, *, timeout: float = 30.0,
                      **kwargs: Any) -> Message: ...


Pinger = Callable[[str], Awaitable[object]]  # one ping to a peer id; raises when it goes unanswered


class RelaySlot:
    """Keep one reservation on a dialable peer, moving to another when the relay goes away.

    `candidates()` lists (peer id, its addresses) of dialable peers, best first; `on_change` is called
    after every new reservation so the owner re-announces its addresses at once.
    """

    def __init__(self, node: RelayHost, candidates: Callable[[], list[tuple[str, list[str]]]],
                 on_change: Callable[[], None], ping: Pinger) -> None:
        self.node = node
        self.candidates = candidates
        self.on_change = on_change
        self.ping = ping
        self.state = RelayState()
        self._banned: dict[str, float] = {}
        self._missed = 0
        self._answered = time.monotonic()  # when the current relay last answered (or was reserved on)

    async def _ping_relay(self, relay: str) -> None:
        """One ping, in a task of its own: a ping that hangs past its deadline on a dead connection must
        not hold up the watch, which judges the relay by how long it has been silent."""
        try:
            with trio.fail_after(PING_TIMEOUT):
                await self.ping(relay)
        except Exception as e:
            if relay == self.state.relay_id:
                self._missed += 1
                log.info("relay %s did not answer a ping (%d/%d): %s", short_id(relay), self._missed, MISSED_PINGS, e)
            return
        if relay == self.state.relay_id:
            self._missed, self._answered = 0, time.monotonic()

    async def _disconnect(self, relay: str) -> None:
        with trio.move_on_after(2):
            try:
                await self.node.host.disconnect(ID.from_base58(relay))
            except Exception:
                pass

    def _silent(self) -> bool:
        return self._missed >= MISSED_PINGS or time.monotonic() - self._answered > SILENCE

    def _alive(self) -> bool:
        relay = self.state.relay_id
        return bool(relay) and not self._silent() and relay in self.node.connected_peers()

    async def _reserve_somewhere(self) -> bool:
        now = time.monotonic()
        options = [(p, a) for p, a in self.candidates() if self._banned.get(p, 0) < now and p != self.node.peer_id]
        for peer, addrs in options:
            try:
                with trio.fail_after(10):
                    if peer not in self.node.connected_peers():  # try each direct address in turn
                        direct = [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in addrs if not is_circuit(a)]
                        await self.node.connect(PeerInfo(ID.from_base58(peer), direct))
                    expire = await reserve(self.node.host, ID.from_base58(peer))
            except Exception as e:
                log.info("no slot on relay %s: %s", short_id(peer), str(e).splitlines()[0] if str(e) else type(e).__name__)
                self._banned[peer] = now + 30
                continue
            mine = circuit_addrs([a for a in addrs if not is_circuit(a)], peer, self.node.peer_id)
            self.state = RelayState(peer, mine, expire)
            self._missed, self._answered = 0, time.monotonic()
            self.node.relay_addrs = mine
            log.info("reachable through relay %s (slot until %s)", short_id(peer), time.strftime("%H:%M:%S", time.localtime(expire)))
            return True
        return False

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Reserve (returning to the caller once the first slot is held or none is to be had), then keep it."""
        started = False
        next_ping = 0.0
        while True:
            if self._alive() and time.monotonic() >= next_ping:
                next_ping = time.monotonic() + PING_PERIOD
                self.node.nursery.start_soon(self._ping_relay, self.state.relay_id)
            if not self._alive():
                if self.state.relay_id:
                    log.warning("relay %s is gone: looking for another", short_id(self.state.relay_id))
                    if self._silent():  # its connection looks open: close it, in the background
                        self.node.nursery.start_soon(self._disconnect, self.state.relay_id)
                    self._banned[self.state.relay_id] = time.monotonic() + 60
                    self.state = RelayState()
                    self.node.relay_addrs = []
                    self.on_change()
                if await self._reserve_somewhere():
                    self.on_change()
                elif not started:
                    log.warning("no relay could give a slot yet: unreachable until one does")
            elif self.state.expire - time.time() < RENEW_BEFORE:
                try:
                    with trio.fail_after(10):
                        self.state.expire = await reserve(self.node.host, ID.from_base58(self.state.relay_id))
                except Exception as e:
                    log.info("refreshing the relay slot failed: %s", e)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(WATCH_PERIOD * random.uniform(0.8, 1.2))


async def establish_reachability(node: RelayHost, candidates: Callable[[], list[tuple[str, list[str]]]],
                                 on_change: Callable[[], None], ping: Pinger) -> RelaySlot | None:
    """Find out whether peers can dial us; if not, hold a relay slot (kept by a task in the node's nursery)
    until the node closes. A node with no peer to ask (the first of a swarm) counts as dialable."""
    dialable, worked = await check_dialable(node, node.connected_peers())
    if dialable is False:
        node.relay_addrs = []
        log.warning("peers cannot dial this node (dial-back failed): serving through a relay")
        slot = RelaySlot(node, candidates, on_change, ping)
        await node.nursery.start(slot.run)
        return slot
    node.observed_addrs = worked
    if dialable:
        log.info("dialable at %s (confirmed by dial-back)", ", ".join(worked))
    else:
        log.info("no peer to confirm this node is dialable; assuming it is")
    return None
