"""One peer must not take a server's cache, memory or compute from the others (net/quotas.py)."""

from __future__ import annotations

import statistics
import struct
from contextlib import AsyncExitStack

import pytest
import torch
import trio

from mesh.model.lora import LoraSpec, init_lora
from mesh.net import wire
from mesh.net.adapters import ClientLora
from mesh.net.client import remote_forward
from mesh.net.messages import ForwardRequest, OpenSession, Step

from hostile import (CACHE_TOKENS, FRAME_SECONDS, MAX_LENGTH, answers, error_code, honest_run, local_run, peer,
                     raw_call)

pytestmark = pytest.mark.e2e
MiB = 1 << 20


async def _open(stack: AsyncExitStack, node, peer_id: str, max_length: int, batch: int = 1):
    """A raw session held open on `stack`; returns (stream, reply)."""
    stream = await stack.enter_async_context(node.stream(peer_id, "inference", timeout=10))
    await wire.write_frame(stream, OpenSession(0, 3, max_length, batch).to_wire() | {"session_id": "s"})
    return stream, await wire.read_frame(stream, timeout=10)


async def test_one_peer_holds_at_most_its_share_of_the_cache(victims):
    """A session of the whole budget, then sessions until refused: the attacker gets half the cache; an
    honest peer still opens a session and computes exactly."""
    first = victims.peer_ids[0]
    async with peer(victims) as (evil, _), peer(victims) as (honest, hswarm), AsyncExitStack() as held:
        _, whole = await _open(held, evil, first, MAX_LENGTH, CACHE_TOKENS // MAX_LENGTH)
        assert error_code(whole) == "busy", whole
        opened = 0
        for _ in range(CACHE_TOKENS // MAX_LENGTH):
            _, reply = await _open(held, evil, first, MAX_LENGTH)
            if error_code(reply) == "busy":
                break
            opened += 1
        assert opened * MAX_LENGTH <= CACHE_TOKENS // 2
        out, _ = await honest_run(honest, hswarm, victims)
    torch.testing.assert_close(out, local_run(victims), rtol=0, atol=1e-5)


async def test_oversized_training_passes_and_kept_graphs_are_bounded(victims):
    """Forwards of twice max_length are refused; of forty kept forwards (~18 MiB of graph each) the server
    keeps the peer's newest four, so it grows by a few graphs, not forty."""
    first = victims.peer_ids[0]
    rss0 = victims.rss()[0]
    async with peer(victims) as (evil, swarm):
        info = swarm.table.get(first)
        x = torch.randn(1, 2 * MAX_LENGTH, 64)
        reply = await raw_call(evil, first, "forward", [ForwardRequest(0, 3, x, torch.arange(2 * MAX_LENGTH)[None]).to_wire()])
        assert error_code(reply) == "bad_request" and "hidden" in reply["error"]["message"], reply
        x = torch.randn(4, MAX_LENGTH, 64)
        pos = torch.arange(MAX_LENGTH)[None].expand(4, -1).contiguous()
        for i in range(40):
            await remote_forward(evil, info, 0, 3, x, pos, keep=f"k{i}")
        assert await answers(evil, victims)
    growth = victims.rss()[0] - rss0
    assert growth < 160 * MiB, f"server grew by {growth / MiB:.0f} MiB"


async def test_lora_rank_and_size_are_bounded(victims):
    first = victims.peer_ids[0]
    config = victims.source.config
    x, pos = torch.randn(1, 4, 64), torch.arange(4)[None]
    async with peer(victims) as (evil, swarm):
        info = swarm.table.get(first)
        big = init_lora(config, LoraSpec(rank=128, alpha=1.0), 0, 6)
        with pytest.raises(Exception, match="rank"):
            await remote_forward(evil, info, 0, 3, x, pos, lora=ClientLora.carrying(big))
        huge = init_lora(config, LoraSpec(rank=1024, alpha=1.0), 0, 6)
        with pytest.raises(Exception, match="exceeds|rank|closed"):
            await remote_forward(evil, info, 0, 3, x, pos, lora=ClientLora.carrying(huge))
        assert await answers(evil, victims)


async def test_stalled_and_oversized_frames_are_dropped(victims):
    """Six streams announce 255 MiB frames (refused at the header); six more stall halfway through a frame
    of allowed size: the server drops them within the frame deadline and its memory stays flat."""
    first = victims.peer_ids[0]
    rss0 = victims.rss()[0]
    async with peer(victims) as (evil, _), AsyncExitStack() as held:
        for _ in range(6):
            stream = await held.enter_async_context(evil.stream(first, "forward", timeout=10))
            await stream.write(struct.pack(">I", 255 * MiB))
            reply = await wire.read_frame(stream, timeout=5)
            assert error_code(reply) == "too_large", reply
        stalled = []
        for _ in range(6):
            stream = await held.enter_async_context(evil.stream(first, "forward", timeout=10))
            await stream.write(struct.pack(">I", 4 * MiB) + bytes(2 * MiB))
            stalled.append(stream)
        with trio.fail_after(FRAME_SECONDS + 10):
            for stream in stalled:
                reply = await wire.read_frame(stream, timeout=FRAME_SECONDS + 10)
                assert error_code(reply) == "timeout", reply
        assert await answers(evil, victims)
    growth = victims.rss()[0] - rss0
    assert growth < 32 * MiB, f"server grew by {growth / MiB:.0f} MiB"


async def test_a_flooding_peer_cannot_stall_an_honest_decode(victims):
    """The attacker floods: forwards of 64 × max_length tokens and max_length prefills on four sessions,
    again and again. The honest client's steps stay fast and exact."""
    first = victims.peer_ids[0]
    async with peer(victims) as (honest, hswarm), peer(victims) as (evil, _):
        _, solo = await honest_run(honest, hswarm, victims)

        async def flood_forwards() -> None:
            x = torch.randn(64, MAX_LENGTH, 64)
            frame = ForwardRequest(0, 3, x, torch.arange(MAX_LENGTH)[None].expand(64, -1).contiguous()).to_wire()
            while True:
                await raw_call(evil, first, "forward", [frame], timeout=30)

        async def flood_session() -> None:
            async with AsyncExitStack() as held:
                stream, reply = await _open(held, evil, first, MAX_LENGTH)
                if error_code(reply):
                    return
                x = torch.randn(1, MAX_LENGTH, 64)
                while True:
                    await wire.write_frame(stream, Step(1, 0, x, torch.arange(MAX_LENGTH)[None]).to_wire(), timeout=30)
                    await wire.read_frame(stream, timeout=30)

        async with trio.open_nursery() as n:
            n.start_soon(flood_forwards)
            for _ in range(4):
                n.start_soon(flood_session)
            await trio.sleep(0.5)
            out, attacked = await honest_run(honest, hswarm, victims)
            n.cancel_scope.cancel()
        assert await answers(honest, victims)
    torch.testing.assert_close(out, local_run(victims), rtol=0, atol=1e-5)
    decode_solo, decode_attacked = solo[1:], attacked[1:]
    assert max(decode_attacked) < max(decode_solo) + 0.5, (decode_solo, decode_attacked)
    assert statistics.median(decode_attacked) < 5 * statistics.median(decode_solo) + 0.05, (decode_solo, decode_attacked)
