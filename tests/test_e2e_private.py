"""Private swarms and allow-lists: two `mesh serve` processes with different swarm keys on loopback never
see each other, a node without a swarm's key cannot connect to it at all, and an allow-listed server
serves its members only."""

from __future__ import annotations

import json

import pytest
import trio
from libp2p.peer.id import ID

from hostile import announcement, error_code, publish, raw_call
from mesh.model.errors import BadRequest, MeshError
from mesh.net import wire
from mesh.net.allowlist import GRACE
from mesh.net.announce import ServerInfo, SignedInfo
from mesh.net.identity import open_identity
from mesh.net.messages import OpenSession, SessionOpened, Snapshot, SnapshotRequest
from mesh.net.node import NodeConfig, open_node
from mesh.net.swarm import open_swarm
from mesh.net.swarmkey import read_swarm_key, write_swarm_key
from mesh.net.wire import NotAllowed
from procs import run_mesh, serve

pytestmark = pytest.mark.e2e


def test_keygen_writes_a_key_only_its_owner_reads_and_bad_files_are_refused(tmp_path):
    path = tmp_path / "swarm.key"
    key = write_swarm_key(path)
    assert read_swarm_key(path) == key and len(key) == 64 and path.stat().st_mode & 0o077 == 0
    with pytest.raises(BadRequest):
        write_swarm_key(path)  # never overwritten
    (tmp_path / "bare.key").write_text(key.upper() + "\n")  # the digits alone are read too
    assert read_swarm_key(tmp_path / "bare.key") == key
    for bad in ("", "/key/swarm/psk/1.0.0/\n/base64/\nAAAA\n", "12ab\n", "x" * 64, "\xff" * 10):
        (tmp_path / "bad.key").write_text(bad)
        with pytest.raises(BadRequest):
            read_swarm_key(tmp_path / "bad.key")


async def test_swarms_with_different_keys_never_see_each_other(tiny30, tmp_path):
    keys = [tmp_path / "a.key", tmp_path / "b.key"]
    hexes = [write_swarm_key(k) for k in keys]
    procs = [serve(tiny30, "0:30", tmp_path / f"{name}.log", [], "--swarm-key", str(key), "--public-name", name)
             for name, key in zip("ab", keys)]
    try:
        a, b = [await p.wait_ready(90) for p in procs]

        async def seen(key: str | None, peers: list[str]) -> set[str]:
            """The servers a node holding `key` learns of through `peers` (PeerUnavailable if none answers)."""
            config = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], initial_peers=peers, dht_mode="client",
                                swarm_key=key, connect_timeout=2)
            async with open_node(config) as node, open_swarm(node) as swarm:
                await swarm.discover("tiny30", timeout=3)
                await swarm.wait_for(lambda t: bool(t.servers("tiny30")), 3)
                return {i.public_name for i in swarm.table.servers("tiny30")}

        # given both swarms' addresses, a member of each reaches its own server only and learns of no other;
        # with no key, or another swarm's, no connection at all; `mesh status` with the right key lists its
        # own swarm only (all at once: each waits on the network, not on the CPU)
        outcomes: dict[str, object] = {}

        async def attempt(name: str, key: str | None, peers: list[str]) -> None:
            try:
                outcomes[name] = await seen(key, peers)
            except MeshError as e:
                outcomes[name] = e

        async def status() -> None:
            outcomes["status"] = await run_mesh("status", "--swarm-key", str(keys[0]), "--initial-peers", a,
                                                "--json", "--timeout", "3")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, "a", hexes[0], [a, b])
            nursery.start_soon(attempt, "b", hexes[1], [a, b])
            nursery.start_soon(attempt, "none", None, [a])
            nursery.start_soon(attempt, "other", hexes[1], [a])
            nursery.start_soon(status)
        assert outcomes["a"] == {"a"} and outcomes["b"] == {"b"}, outcomes
        for name in ("none", "other"):
            refused = outcomes[name]
            assert isinstance(refused, MeshError) and "initial peers answered" in str(refused), refused
            assert "--swarm-key" in refused.hint
        result = outcomes["status"]
        assert result.returncode == 0, result.stderr.decode()
        (model,) = json.loads(result.stdout)["models"]
        assert [s["public_name"] for s in model["servers"]] == ["a"]
    finally:
        for p in procs:
            p.cleanup()


def signed(node) -> bytes:
    """`node`'s own announcement of blocks 0:30 of tiny30, signed by it."""
    info = ServerInfo.from_wire(announcement(node, "tiny30", start=0, end=30, total_blocks=30))
    return SignedInfo.sign(info, node.host.get_private_key()).to_bytes()


async def test_an_allow_listed_server_serves_its_members_only(tiny30, tmp_path):
    """A member's session opens; a stranger's request gets the typed `not_allowed` refusal and its
    connection is closed; what a stranger announces never enters the server's table."""
    member_key = tmp_path / "member.key"
    identity = open_identity(member_key)
    member_id = ID.from_pubkey(identity.key_pair.public_key).to_base58()
    identity.release()
    allow = tmp_path / "allow.txt"
    allow.write_text(f"# who may use this server\n{member_id}  # the lab's client\n")
    server = serve(tiny30, "0:30", tmp_path / "s.log", [], "--allow-peers", str(allow))
    try:
        addr = await server.wait_ready(90)
        open_request = [OpenSession(0, 30, 16).to_wire()]
        member_config = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], initial_peers=[addr], dht_mode="client",
                                   identity_path=member_key)
        async with open_node(member_config) as member, open_swarm(member) as member_swarm:
            reply = await raw_call(member, server.peer_id, "inference", open_request)
            assert error_code(reply) is None and SessionOpened.from_wire(reply).session_id
            # a stranger connected to the member only: both announce; the member forwards the stranger's
            # announcement to the server, whose table takes the member's and never the stranger's
            stranger_config = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], initial_peers=[member.addrs[0]],
                                         dht_mode="client")
            async with open_node(stranger_config) as stranger, open_swarm(stranger) as stranger_swarm:
                await member_swarm.follow("tiny30")
                for node, swarm in ((member, member_swarm), (stranger, stranger_swarm)):
                    await publish(node, swarm, "tiny30", [signed(node)])
                assert await member_swarm.wait_for(lambda t: t.get(stranger.peer_id) is not None, 10)

                async def servers_on_server() -> set[str]:
                    reply = await member.request(server.peer_id, "swarm", SnapshotRequest("tiny30"), reply=Snapshot)
                    return {SignedInfo.open(raw)[1].peer_id for raw in reply.servers}

                with trio.fail_after(15):
                    while member.peer_id not in (seen := await servers_on_server()):
                        await trio.sleep(0.5)
                assert stranger.peer_id not in seen

                # the stranger's own request: the typed refusal, then its connection is closed
                await stranger.connect(addr)
                reply = await raw_call(stranger, server.peer_id, "inference", open_request)
                assert error_code(reply) == "not_allowed", reply
                with pytest.raises(NotAllowed):
                    wire.raise_if_error(reply)
                with trio.fail_after(GRACE + 5):
                    while server.peer_id in stranger.connected_peers():
                        await trio.sleep(0.1)
            assert "not on the allow-list" in server.output()
            assert server.peer_id in member.connected_peers()  # members keep their connection
    finally:
        server.cleanup()
