"""One peer must not reach into another's session, adapter or swarm entry, nor steer a server's dials."""

from __future__ import annotations

import functools
import math
import time

import torch
import trio

import pytest

from mesh.model.errors import BadRequest
from mesh.model.lora import LoraSpec, init_lora
from mesh.net import wire
from mesh.net.adapters import ClientLora, content_key
from mesh.net.announce import MAX_RATE, MAX_TTL, ServerInfo, ServerState
from mesh.net.chain import ChainOpener
from mesh.net.client import remote_forward
from mesh.net.messages import OpenSession, Snapshot, SnapshotRequest, Step, StepResult

from hostile import (announcement, answers, chain_config, error_code, honest_inputs, local_run, peer, publish,
                     raw_call, signed_raw)

pytestmark = pytest.mark.e2e


async def test_a_push_naming_another_peers_session_is_refused(victims):
    """Even knowing the id of an honest session on the second server (a leak), an attacker's pushes are
    refused: only the predecessor the opener named may push. The honest outputs do not change."""
    inputs = honest_inputs()
    async with peer(victims) as (honest, hswarm), peer(victims) as (evil, _):
        cfg = chain_config(honest, hswarm, victims)
        opener = ChainOpener(cfg, lambda links, n: 10.0, iter(range(1, 1000)).__next__)
        route = await opener.plan(0, 6, frozenset())
        links = await opener.open_hops(route, None)
        try:
            victim_session = links[-1].session.session_id
            poison = Step(1, 0, torch.full((1, 8, 64), 7.0), torch.arange(8)[None], session_id=victim_session)
            reply = await raw_call(evil, links[-1].hop.peer_id, "push", [poison.to_wire()])
            assert error_code(reply) == "bad_request", reply
            # the honest chain still computes what blocks 0:6 compute
            outs, position = [], 0
            for x in inputs[:3]:
                n = x.shape[1]
                step = Step(position + 1, position, x, torch.arange(position, position + n)[None])
                await links[0].send(step, 10)
                frame = wire.raise_if_error(await wire.read_frame(links[-1].session.stream, timeout=10))
                outs.append(StepResult.from_wire(frame).hidden)
                position += n
        finally:
            for link in links:
                await link.close()
    want = local_run(victims, inputs[:3])
    torch.testing.assert_close(torch.cat(outs, dim=1), want, rtol=0, atol=1e-5)


async def test_an_adapter_is_its_content_not_its_name(victims):
    """Two peers' adapters never collide: a second peer re-using the first one's key with other weights
    is refused, and the first one's outputs stay the same."""
    config = victims.source.config
    mine = init_lora(config, LoraSpec(rank=2, alpha=4.0), 0, 6, torch.Generator().manual_seed(1), zero_b=False)
    theirs = init_lora(config, LoraSpec(rank=2, alpha=4.0), 0, 6, torch.Generator().manual_seed(2), zero_b=False)
    x, pos = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3)), torch.arange(5)[None]
    async with peer(victims) as (honest, hswarm), peer(victims) as (evil, _):
        server = hswarm.table.get(victims.peer_ids[0])
        lora = ClientLora.carrying(mine)
        before = await remote_forward(honest, server, 0, 3, x, pos, lora=lora)
        forged = ClientLora.carrying(theirs)
        forged._keys[0, 3] = lora.key(0, 3)  # the attacker names its weights with the victim's key
        with pytest.raises(BadRequest, match="sha256"):
            await remote_forward(evil, server, 0, 3, x, pos, lora=forged)
        after = await remote_forward(honest, server, 0, 3, x, pos, lora=lora)
    assert lora.key(0, 3) == content_key(mine.spec, 0, 3, mine.sub(0, 3).tensors())
    assert torch.equal(before, after)


async def test_a_snapshot_cannot_carry_entries_their_servers_did_not_sign(victims):
    """A peer answers snapshots with a forged entry for a real server (another span, a huge throughput)
    and a plain unsigned one: the asker keeps the real server's own words."""
    async with peer(victims) as (evil, _), peer(victims) as (honest, hswarm):
        real = victims.peer_ids[0]
        forged = ServerInfo(real, victims.model_id, 0, 6, ServerState.ONLINE, ["/ip4/127.0.0.1/tcp/9"],
                            throughput=1e9, timestamp=time.time() + 1e6, total_blocks=6)

        async def handle(stream) -> None:
            SnapshotRequest.from_wire(await wire.read_frame(stream, timeout=5))
            entries = [forged.to_wire(), signed_raw(evil, forged.to_wire()), b"\x00" * 10, 5]
            await wire.write_frame(stream, Snapshot(entries, [0.0] * len(entries)).to_wire())

        evil.set_handler("swarm", handle)
        await honest.connect(evil.addrs[0], timeout=5)
        assert await hswarm.fetch_snapshot(evil.peer_id, victims.model_id) == 0
        entry = hswarm.table.get(real)
        assert entry is not None and (entry.start, entry.end) == (0, 3) and entry.throughput < 1e6


async def test_announced_numbers_are_bounded(victims):
    """Rates of 1e300, negative next-hop pings, a NaN timestamp, a TTL of 1e18: refused or clamped, so the
    entry neither lives forever nor draws routes, and servers do not pass the values on."""
    async with peer(victims) as (evil, swarm), peer(victims) as (honest, hswarm):
        now = time.time()
        bounded = announcement(evil, victims.model_id, throughput=1e300, inference_rps=1e300, ttl=1e18, timestamp=now)
        refused = [announcement(evil, victims.model_id, next_pings={victims.peer_ids[0]: -5.0}, timestamp=now + 1),
                   announcement(evil, victims.model_id, timestamp=math.nan)]
        await publish(evil, swarm, victims.model_id, [signed_raw(evil, bounded)]
                       + [signed_raw(evil, b) for b in refused])
        with trio.fail_after(10):
            while hswarm.table.get(evil.peer_id) is None:
                await trio.sleep(0.1)
        await trio.sleep(0.5)
        entry = hswarm.table.get(evil.peer_id)
        assert entry.throughput <= MAX_RATE and entry.inference_rps <= MAX_RATE and entry.ttl <= MAX_TTL
        assert entry.timestamp == now and not entry.next_pings  # the later, refused ones did not replace it
        # what a server passes on in its snapshot is the same bounded entry
        async with peer(victims, follow=False) as (newcomer, nswarm):
            await nswarm.fetch_snapshot(victims.peer_ids[1], victims.model_id)
            passed_on = nswarm.table.get(evil.peer_id)
            assert passed_on is not None and passed_on.throughput <= MAX_RATE
        assert await answers(honest, victims)


async def test_a_server_never_dials_where_a_client_says(victims):
    """`next` names a peer with addresses of the attacker's choosing (a listener here): the server does
    not dial them; the session answers that the push failed."""
    dialled = []

    async def listener(stream) -> None:
        dialled.append(True)

    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, listener, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with peer(victims) as (evil, _):
            from libp2p.crypto.ed25519 import create_new_key_pair
            from libp2p.peer.id import ID

            stranger = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
            frame = OpenSession(0, 3, 16).to_wire() | {"session_id": "s2"}
            frame["next"] = {"peer_id": stranger, "session_id": "x",
                             "addrs": [f"/ip4/127.0.0.1/tcp/{port}/p2p/{stranger}"]}
            async with evil.stream(victims.peer_ids[0], "inference") as stream:
                await wire.write_frame(stream, frame)
                assert "session_id" in await wire.read_frame(stream, timeout=10)
                await wire.write_frame(stream, Step(1, 0, torch.randn(1, 2, 64), torch.arange(2)[None]).to_wire())
                reply = await wire.read_frame(stream, timeout=20)
            assert error_code(reply) == "unavailable", reply
            await trio.sleep(0.5)
            assert await answers(evil, victims)
        n.cancel_scope.cancel()
    assert not dialled
