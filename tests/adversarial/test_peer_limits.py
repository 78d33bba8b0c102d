"""One peer cannot take more than its share of a node (net/peerlimits.py: py-libp2p's rcmgr limits),
and an honest peer is still served while it tries. Real nodes on loopback; every wait has a deadline."""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack, asynccontextmanager

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.network.config import ConnectionConfig
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.rcmgr import ResourceManager
from libp2p.rcmgr.connection_limits import ConnectionLimits

from mesh.net import wire
from mesh.net.messages import Ping, Pong
from mesh.net.peerlimits import PeerLimits

from conftest import LOOPBACK, running_nodes


class Connections(INotifee):
    """Connections the server registered per peer: now and the most at once."""

    def __init__(self) -> None:
        self.now: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.opened: Counter[str] = Counter()

    async def connected(self, network, conn) -> None:
        peer = conn.muxed_conn.peer_id.to_base58()
        self.now[peer] += 1
        self.opened[peer] += 1
        self.peak[peer] = max(self.peak[peer], self.now[peer])

    async def disconnected(self, network, conn) -> None:
        self.now[conn.muxed_conn.peer_id.to_base58()] -= 1

    async def opened_stream(self, network, stream) -> None: ...
    async def closed_stream(self, network, stream) -> None: ...
    async def listen(self, network, multiaddr) -> None: ...
    async def listen_close(self, network, multiaddr) -> None: ...


@asynccontextmanager
async def attacker():
    """A bare libp2p host that limits nothing on its own side: it may dial one peer again and again."""
    host = new_host(muxer_preference="YAMUX", connection_config=ConnectionConfig(max_connections_per_peer=64),
                    resource_manager=ResourceManager(connection_limits=ConnectionLimits(), enable_rate_limiting=False))
    async with AsyncExitStack() as stack:
        stack.push_async_callback(host.close)
        await stack.enter_async_context(host.run(listen_addrs=[multiaddr.Multiaddr(LOOPBACK[0])]))
        yield host


def serve_pong(node) -> None:
    async def pong(stream):
        ping = Ping.from_wire(await wire.read_frame(stream, timeout=5))
        await wire.write_frame(stream, Pong(ping.nonce).to_wire())

    node.set_handler("pong", pong)


async def honest_is_served(honest, server) -> None:
    with trio.fail_after(5):
        await honest.connect(server.addrs[0])
        assert (await honest.request(server.peer_id, "pong", Ping(7), timeout=3, reply=Pong)).nonce == 7


async def dial(host, server) -> None:
    """One more connection to `server`; the server may close it right after the handshake."""
    with trio.move_on_after(3):
        try:
            await host.get_network().dial_addr(multiaddr.Multiaddr(server.addrs[0].split("/p2p/")[0]),
                                               ID.from_base58(server.peer_id))
        except Exception:
            pass  # refused


async def test_one_peer_cannot_hold_more_connections_than_its_share():
    limit = PeerLimits().connections_per_peer
    async with running_nodes(2) as (server, honest), attacker() as bad:
        serve_pong(server)
        seen = Connections()
        server.host.get_network().register_notifee(seen)
        with trio.fail_after(8):
            async with trio.open_nursery() as n:
                for _ in range(3 * limit):
                    n.start_soon(dial, bad, server)
        await trio.sleep(0.2)  # let the server finish the last handshakes
        assert 0 < seen.peak[bad.get_id().to_base58()] <= limit, seen.peak
        await honest_is_served(honest, server)


async def test_a_peer_that_reconnects_in_a_loop_is_refused():
    limits = PeerLimits(connection_burst_per_peer=3, connection_rate_per_peer=0.1)
    async with running_nodes(2, peer_limits=limits) as (server, honest), attacker() as bad:
        serve_pong(server)
        seen = Connections()
        server.host.get_network().register_notifee(seen)
        with trio.fail_after(8):
            for _ in range(8):
                await dial(bad, server)
                await bad.get_network().close_peer(ID.from_base58(server.peer_id))
        await trio.sleep(0.2)
        assert seen.opened[bad.get_id().to_base58()] == limits.connection_burst_per_peer, seen.opened
        await honest_is_served(honest, server)


STREAMS_PER_PEER = PeerLimits().streams_per_peer  # counted by Node.set_handler: rcmgr 0.8.1 has no such limit


async def test_one_peer_cannot_hold_more_streams_than_its_share():
    async with running_nodes(3) as (server, bad, honest):
        serve_pong(server)
        held = 0

        async def stall(stream):
            nonlocal held
            held += 1
            await trio.sleep(30)

        server.set_handler("stall", stall)
        await bad.connect(server.addrs[0])

        async def one():  # on the raw host: our own nodes never open more than their share
            try:
                stream = await bad.host.new_stream(ID.from_base58(server.peer_id), [TProtocol(wire.protocol_id("stall"))])
                await trio.sleep(30)
                await stream.close()
            except Exception:
                pass  # refused

        with trio.fail_after(8):
            async with trio.open_nursery() as n:
                for _ in range(STREAMS_PER_PEER + 40):  # Yamux itself stalls at 256 streams
                    n.start_soon(one)
                await trio.sleep(2.5)
                await honest_is_served(honest, server)
                n.cancel_scope.cancel()
        assert held <= STREAMS_PER_PEER, held
