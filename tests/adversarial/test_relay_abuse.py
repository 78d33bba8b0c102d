"""A relay must not let one peer fill its reservation slots by naming made-up peer ids in RESERVE."""

from __future__ import annotations

import time

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL

from mesh.net import wire
from mesh.net.relay import RESERVATION_TTL, RelayRefused, _hop, reserve

from conftest import running_nodes

ATTACKS = 70  # more than the relay's 64 slots


def made_up_peer() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


async def test_reserve_naming_other_peers_cannot_fill_the_relay():
    # Results are checked after the nodes close: a failure inside their nurseries would come out
    # buried in nested exception groups.
    async with running_nodes(1, relay_service=True) as (relay,), running_nodes(2) as (attacker, honest):
        relay_id = ID.from_base58(relay.peer_id)
        manager = relay.host.get_mux().handlers[HOP_PROTOCOL].__self__.resource_manager
        fakes = {made_up_peer() for _ in range(ATTACKS)}
        with trio.fail_after(8):
            await attacker.connect(relay.addrs[0])
            await honest.connect(relay.addrs[0])
            for fake in fakes:
                try:
                    stream, _ = await _hop(attacker.host, relay_id,
                                           HopMessage(type=HopMessage.RESERVE, peer=PeerId(id=fake.to_bytes())))
                except RelayRefused:  # the attack goes on whatever the relay answers
                    continue
                await wire.close_quietly(stream)
        after_attack = set(manager._reservations)
        try:
            with trio.fail_after(5):
                expire: float | RelayRefused = await reserve(honest.host, relay_id)
        except RelayRefused as e:
            expire = e
        granted_at = time.time()
        after_honest = set(manager._reservations)
        attacker_id, honest_id = ID.from_base58(attacker.peer_id), ID.from_base58(honest.peer_id)

    assert not after_attack & fakes, f"{len(after_attack & fakes)} slots reserved for made-up peers"
    assert after_attack <= {attacker_id}, after_attack
    assert isinstance(expire, float), f"an honest peer got no slot: {expire}"
    assert granted_at < expire <= granted_at + RESERVATION_TTL + 2
    assert after_honest == {attacker_id, honest_id}
