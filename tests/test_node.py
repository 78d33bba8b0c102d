"""The libp2p node and the swarm table, with real hosts on loopback (py-libp2p's traps, one by one)."""

from __future__ import annotations

import time

import pytest
import trio

from mesh.net import wire
from mesh.net.messages import Ping, Pong
from mesh.net.node import MAX_STREAMS_PER_PEER, NodeConfig, open_node
from mesh.net.announce import ServerInfo, ServerState
from mesh.net.swarm import SwarmTable, open_swarm

from conftest import LOOPBACK, running_nodes


def info(peer: str, start: int = 0, end: int = 4, state=ServerState.ONLINE, model: str = "m", ttl: float = 15.0):
    return ServerInfo(peer, model, start, end, state, timestamp=time.time(), ttl=ttl)


async def test_connect_is_fast():
    """No 250 ms happy-eyeballs wait per dial."""
    async with running_nodes(2) as (a, b):
        t0 = time.perf_counter()
        await b.connect(a.addrs[0])
        assert time.perf_counter() - t0 < 0.15


async def test_handler_error_is_answered_and_node_survives():
    async with running_nodes(2) as (a, b):
        async def broken(stream):
            await wire.read_frame(stream, timeout=5)
            raise RuntimeError("boom")

        async def pong(stream):
            ping = Ping.from_wire(await wire.read_frame(stream, timeout=5))
            await wire.write_frame(stream, Pong(ping.nonce).to_wire())

        a.set_handler("broken", broken)
        a.set_handler("pong", pong)
        await b.connect(a.addrs[0])
        with pytest.raises(wire.RemoteError, match="boom"):
            await b.request(a.peer_id, "broken", Ping(1), timeout=5)
        reply = await b.request(a.peer_id, "pong", Ping(7), timeout=5, reply=Pong)
        assert reply.nonce == 7


async def test_more_streams_than_yamux_allows_do_not_hang():
    """Yamux blocks the 257th concurrent stream forever; our per-peer bound queues them instead."""
    async with running_nodes(2) as (a, b):
        release = trio.Event()

        async def hold(stream):
            await release.wait()
            await wire.write_frame(stream, {"ok": True})

        a.set_handler("hold", hold)
        await b.connect(a.addrs[0])
        done = []

        async def one():
            async with b.stream(a.peer_id, "hold", timeout=30) as s:
                done.append((await wire.read_frame(s, timeout=30))["ok"])

        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                for _ in range(300):
                    n.start_soon(one)
                await trio.sleep(1.0)
                assert b._stream_slots[a.peer_id].value == 0  # all slots in use, the rest wait
                release.set()
        assert len(done) == 300 and MAX_STREAMS_PER_PEER < 256


async def test_stalled_peer_hits_read_deadline():
    async with running_nodes(2) as (a, b):
        async def silent(stream):
            await trio.sleep(30)

        a.set_handler("silent", silent)
        await b.connect(a.addrs[0])
        t0 = time.perf_counter()
        with pytest.raises(wire.FrameTimeout):
            await b.request(a.peer_id, "silent", Ping(1), timeout=0.5)
        assert time.perf_counter() - t0 < 3


async def test_identity_persists(tmp_path):
    key = tmp_path / "id.key"
    async with open_node(NodeConfig(listen=LOOPBACK, identity_path=key)) as n1:
        first = n1.peer_id
    assert key.stat().st_mode & 0o777 == 0o600
    async with open_node(NodeConfig(listen=LOOPBACK, identity_path=key)) as n2:
        assert n2.peer_id == first


async def test_close_leaves_no_connection():
    async with running_nodes(1) as (a,):
        async with open_node(NodeConfig(listen=LOOPBACK, initial_peers=[a.addrs[0]])) as b:
            assert b.peer_id in a.connected_peers()
        with trio.fail_after(5):
            while b.peer_id in a.connected_peers():
                await trio.sleep(0.05)


async def test_unreachable_initial_peers_fail_clearly():
    from mesh.net.node import PeerUnavailable

    with trio.fail_after(30):
        with pytest.raises(PeerUnavailable, match="none of the 1 initial peers"):
            async with open_node(NodeConfig(listen=LOOPBACK, connect_timeout=3, initial_peers=[
                    "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWGfF2mBkoXqiJwoVaRwm3qTFopm1XreeKQCyvjfMZTyms"])):
                pass


def test_table_expiry_and_offline():
    now = [50.0]
    table = SwarmTable(clock=lambda: now[0])
    table.update(ServerInfo("a", "m", 0, 4, ServerState.ONLINE, timestamp=1000.0, ttl=5))
    table.update(ServerInfo("b", "m", 4, 8, ServerState.ONLINE, timestamp=1000.0, ttl=50))
    assert table.coverage("m", 8) == [1] * 8
    now[0] = 56.0
    assert [i.peer_id for i in table.servers("m")] == ["b"]
    table.update(ServerInfo("b", "m", 4, 8, ServerState.OFFLINE, timestamp=1006.0))
    assert table.servers("m") == []
    table.update(ServerInfo("c", "m", 0, 8, ServerState.ONLINE, timestamp=1006.0))
    table.update(ServerInfo("c", "m", 0, 2, ServerState.ONLINE, timestamp=1001.0))  # stale copy
    assert table.get("c").end == 8


async def test_a_training_hop_whose_entry_lapsed_is_called_at_its_last_known_entry():
    """A late announcement must not cost a training pass its hop (and the hop its kept activations): the
    hop is called at the entry last seen, and a server really gone fails to connect instead."""
    from mesh.net.chain import ChainConfig
    from mesh.net.node import PeerUnavailable
    from mesh.net.training import SwarmBlocks

    now = [50.0]
    table = SwarmTable(clock=lambda: now[0])
    table.update(ServerInfo("a", "m", 0, 4, ServerState.ONLINE, inference_rps=100.0, forward_rps=100.0,
                            timestamp=1000.0, ttl=5))
    blocks = SwarmBlocks(ChainConfig(None, table, None, "m", 4), spread=True)
    (hop,) = await blocks._route(0, 4)
    now[0] = 60.0  # the entry lapses after the route was chosen
    assert table.get("a") is None and blocks._info(hop.peer_id).peer_id == "a"
    with pytest.raises(PeerUnavailable, match="not in the swarm"):
        blocks._info("b")


async def test_a_training_route_waits_for_missing_blocks():
    """Like an inference chain, a training pass waits up to `route_wait` for a server of missing blocks
    (one joining, or late to announce), then fails with the blocks' name."""
    from mesh.net.chain import ChainConfig, RouteUnavailable
    from mesh.net.training import SwarmBlocks

    table = SwarmTable()
    blocks = SwarmBlocks(ChainConfig(None, table, None, "m", 4, route_wait=5.0), spread=True)

    async def join_late() -> None:
        await trio.sleep(0.3)
        table.update(ServerInfo("a", "m", 0, 4, ServerState.ONLINE, inference_rps=100.0, forward_rps=100.0,
                                timestamp=time.time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(join_late)
        with trio.fail_after(3):
            assert [h.peer_id for h in await blocks._route(0, 4)] == ["a"]
    with trio.fail_after(3), pytest.raises(RouteUnavailable, match="no server holds block 0 of m2"):
        await SwarmBlocks(ChainConfig(None, table, None, "m2", 4, route_wait=0.6), spread=True)._route(0, 4)


async def test_a_training_route_takes_only_servers_the_client_accepts():
    """An exact client trains on float32 servers only, as it generates: the quantized one is passed over."""
    from mesh.net.chain import ChainConfig
    from mesh.net.inference import is_exact
    from mesh.net.training import SwarmBlocks

    table = SwarmTable()
    for peer, quant, rps in (("fast-nf4", "nf4", 1000.0), ("exact", "none", 10.0)):
        table.update(ServerInfo(peer, "m", 0, 4, ServerState.ONLINE, inference_rps=rps, forward_rps=rps,
                                throughput=rps, quant=quant, dtype="float32", timestamp=time.time()))
    blocks = SwarmBlocks(ChainConfig(None, table, None, "m", 4, accept=is_exact), spread=True)
    with trio.fail_after(3):
        for _ in range(5):
            assert [h.peer_id for h in await blocks._route(0, 4)] == ["exact"]


def test_routing_counts_each_servers_load():
    """Two servers of equal speed: the one with 8 open sessions in passes of 2 rows (a step takes 5× an idle
    one's) loses to the one with a single session."""
    from mesh.balancing.routing import min_latency_chain
    from mesh.net.chain import candidates

    busy = ServerInfo("busy", "m", 0, 4, ServerState.ONLINE, inference_rps=100.0, sessions=8, batch=2.0)
    calm = ServerInfo("calm", "m", 0, 4, ServerState.ONLINE, inference_rps=100.0, sessions=1, batch=1.0)
    rates = {c.peer_id: c.throughput for c in candidates([busy, calm])}
    assert rates == {"busy": pytest.approx(20.0), "calm": pytest.approx(50.0)}
    assert [h.peer_id for h in min_latency_chain(candidates([busy, calm]), 0, 4)] == ["calm"]
    assert [h.peer_id for h in min_latency_chain(candidates([busy, ServerInfo(**{**vars(calm), "sessions": 30})]),
                                                 0, 4)] == ["busy"]


def test_table_expiry_runs_on_the_local_clock_not_the_announcers():
    """A server whose wall clock is a minute behind (or ahead) is live for its ttl after we hear it;
    an entry learned from a snapshot keeps only what its sender says is left of its life."""
    now = [100.0]
    table = SwarmTable(clock=lambda: now[0])
    table.update(ServerInfo("behind", "m", 0, 4, ServerState.ONLINE, timestamp=time.time() - 60, ttl=3))
    table.update(ServerInfo("ahead", "m", 4, 8, ServerState.ONLINE, timestamp=time.time() + 60, ttl=3))
    table.update(ServerInfo("relayed", "m", 0, 8, ServerState.ONLINE, timestamp=time.time(), ttl=3), age=2.0)
    now[0] = 102.5
    assert [i.peer_id for i in table.servers("m")] == ["behind", "ahead"]
    assert table.age("behind") == pytest.approx(2.5)
    now[0] = 103.5
    assert table.servers("m") == []
    # a copy of an announcement already heard does not extend its life
    again = ServerInfo("c", "m", 0, 8, ServerState.ONLINE, timestamp=5.0, ttl=3)
    table.update(again)
    now[0] = 105.0
    table.update(ServerInfo(**vars(again)), age=0.0)
    now[0] = 106.6
    assert table.get("c") is None


async def test_gossip_crosses_a_chain_and_bursts_are_not_dropped():
    """25 announcements at once (above the default 10 msg/s spam limit) all cross two hops."""
    from mesh.net.announce import SignedInfo
    from mesh.net.swarm import topic

    async with running_nodes(1) as (a,):
        async with open_node(NodeConfig(listen=LOOPBACK, initial_peers=[a.addrs[0]])) as b:
            async with open_node(NodeConfig(listen=LOOPBACK, initial_peers=[b.addrs[0]])) as c:
                async with open_swarm(a) as sa, open_swarm(b, ["m"]):
                    sub = await c.subscribe(topic("m"))
                    await sa.follow("m")
                    await trio.sleep(1.5)  # one heartbeat to graft the mesh
                    for end in range(1, 26):
                        await sa.announce(ServerInfo(a.peer_id, "m", 0, end, ServerState.ONLINE))
                    seen = set()
                    with trio.fail_after(5):
                        while len(seen) < 25:
                            seen.add(SignedInfo.open((await sub.get()).data)[1].end)
                    assert c.peer_id not in a.connected_peers()  # it came over two hops


async def test_newcomer_gets_snapshot_at_once():
    async with running_nodes(1) as (a,):
        async with open_swarm(a) as sa:
            await sa.announce(ServerInfo(a.peer_id, "m", 0, 5, ServerState.ONLINE))
            async with open_node(NodeConfig(listen=LOOPBACK, initial_peers=[a.addrs[0]])) as b, open_swarm(b) as sb:
                t0 = time.perf_counter()
                await sb.discover("m", timeout=5)
                assert [i.end for i in sb.table.servers("m")] == [5]
                assert time.perf_counter() - t0 < 1.0


async def test_dht_finds_a_models_server_when_bootstrap_is_not_one():
    """A client bootstrapping through an unrelated peer finds the model's server via provider records."""
    async with running_nodes(1) as (relay,):
        async with open_node(NodeConfig(listen=LOOPBACK, initial_peers=[relay.addrs[0]])) as server, \
                open_swarm(relay), open_swarm(server) as ss:
            await ss.announce(ServerInfo(server.peer_id, "m", 0, 5, ServerState.ONLINE))
            async with open_node(NodeConfig(listen=LOOPBACK, initial_peers=[relay.addrs[0]], dht_mode="client")) as c, \
                    open_swarm(c) as sc:
                t0 = time.perf_counter()
                with trio.fail_after(15):
                    while not sc.table.servers("m"):  # the provider record may still be on its way
                        await sc.discover("m", timeout=5)
                assert relay.peer_id in c.connected_peers() and server.peer_id in c.connected_peers()
                assert [i.peer_id for i in sc.table.servers("m")] == [server.peer_id]
                print(f"found through the DHT in {time.perf_counter() - t0:.2f} s")


async def test_dialback_confirms_a_listening_port_and_refuses_a_closed_one():
    from mesh.net.relay import DialBack, DialBackReply, check_dialable

    async with running_nodes(2) as (a, b):
        await b.connect(a.addrs[0])
        dialable, worked = await check_dialable(b, [a.peer_id])
        port = int(b.addrs[0].split("/tcp/")[1].split("/")[0])
        assert dialable is True and worked == [f"/ip4/127.0.0.1/tcp/{port}"]
        with trio.socket.socket() as s:  # a port that nothing listens on
            await s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        reply = await b.request(a.peer_id, "dialback", DialBack([closed]), timeout=10, reply=DialBackReply)
        assert reply.dialable == []
        assert await check_dialable(b, []) == (None, [])


def test_circuit_addresses_are_kept_apart_from_direct_ones():
    from mesh.net.relay import circuit_addrs, split_circuit

    relay, target = "12D3KooWRelay", "12D3KooWTarget"
    addrs = circuit_addrs(["/ip4/10.0.0.1/tcp/31337", f"/ip4/10.0.0.2/tcp/1/p2p/{relay}",
                           f"/ip4/10.0.0.3/tcp/1/p2p/{relay}/p2p-circuit/p2p/x"], relay, target)
    assert addrs == [f"/ip4/10.0.0.1/tcp/31337/p2p/{relay}/p2p-circuit/p2p/{target}",
                     f"/ip4/10.0.0.2/tcp/1/p2p/{relay}/p2p-circuit/p2p/{target}"]
    assert split_circuit(addrs[0]) == (f"/ip4/10.0.0.1/tcp/31337/p2p/{relay}", target)
    with pytest.raises(ValueError):
        split_circuit("/ip4/10.0.0.1/tcp/31337")
