"""Frames that used to end a server process: it must stay up and keep serving the honest client exactly."""

from __future__ import annotations

import math
import time

import msgpack
import pytest
import torch
import trio

from mesh.net import wire
from mesh.net.messages import OpenSession, Step
from mesh.net.swarm import topic

from hostile import announcement, answers, heard_by_all, honest_run, local_run, peer, publish, signed_raw
from procs import serve

pytestmark = pytest.mark.e2e


async def test_malformed_signed_announcements_do_not_end_servers(victims):
    """`addrs` an int, `ttl` a string, NaN rates, in the old plain format and signed: all dropped."""
    async with peer(victims) as (evil, swarm):
        bad = [announcement(evil, victims.model_id, addrs=5), announcement(evil, victims.model_id, ttl="long"),
               announcement(evil, victims.model_id, throughput=math.nan), announcement(evil, victims.model_id, state="SLEEPY")]
        payloads = [msgpack.packb(b, use_bin_type=True) for b in bad] + [signed_raw(evil, b) for b in bad]
        marker = announcement(evil, victims.model_id, start=5, end=6, state="JOINING")  # valid, sent last
        await publish(evil, swarm, victims.model_id, payloads + [b"\xc1garbage", signed_raw(evil, marker)])
        async with peer(victims) as (honest, hswarm):
            await heard_by_all(hswarm, victims, evil.peer_id, 6)  # so the bad ones reached them first
            assert await answers(honest, victims)
            out, _ = await honest_run(honest, hswarm, victims)
    assert victims.alive()
    torch.testing.assert_close(out, local_run(victims), rtol=0, atol=1e-5)


async def test_an_error_frame_on_the_push_stream_does_not_end_the_server(victims):
    """The attacker names itself as `next` of its own session and answers the server's push with an error
    that is not even a map."""
    pushed = trio.Event()

    async def push_handler(stream) -> None:
        await wire.read_frame(stream, timeout=10)
        await wire.write_frame(stream, {"error": "boom"})
        await wire.write_frame(stream, {"error": {"code": 5, "message": ["x"], "step_id": "nine"}})
        pushed.set()
        await trio.sleep(2)

    async with peer(victims) as (evil, swarm):
        evil.set_handler("push", push_handler)
        first = victims.peer_ids[0]
        async with evil.stream(first, "inference") as stream:
            frame = OpenSession(0, 3, 16).to_wire() | {"session_id": "s1"}  # (older servers wanted one)
            frame["next"] = {"peer_id": evil.peer_id, "session_id": "mine", "addrs": []}
            await wire.write_frame(stream, frame)
            opened = await wire.read_frame(stream)
            assert "session_id" in opened, opened
            await wire.write_frame(stream, Step(1, 0, torch.randn(1, 2, 64), torch.arange(2)[None]).to_wire())
            with trio.fail_after(10):
                await pushed.wait()
            replies = [await wire.read_frame(stream, timeout=5) for _ in range(2)]
        assert all(r["error"]["code"] == "unavailable" and r["error"]["peer_id"] == evil.peer_id for r in replies)
        await trio.sleep(0.5)
        assert await answers(evil, victims)


async def test_nan_and_huge_numbers_reach_no_balancing_server(victims, tmp_path):
    """A `--blocks auto` server sees announcements with NaN and 1e300 rates before choosing, and while
    rebalancing every second: it chooses, serves and stays up."""
    async with peer(victims) as (evil, swarm):
        bad = [announcement(evil, victims.model_id, throughput=math.nan), announcement(evil, victims.model_id, throughput=1e300),
               announcement(evil, victims.model_id, inference_rps=-math.inf, ttl=1e18)]
        await publish(evil, swarm, victims.model_id, [signed_raw(evil, b) for b in bad]
                       + [msgpack.packb(b, use_bin_type=True) for b in bad])
        auto = serve(victims.folder, "auto", tmp_path / "auto.log", victims.addrs[:1], "--balance-period", "1",
                     "--join-delay", "0.1", "--max-memory", "0.01")
        try:
            with trio.fail_after(60):
                while not auto.ready():  # keep the poison fresh while it starts, then while it rebalances
                    await _poison(evil, victims.model_id, bad)
            for _ in range(3):  # rebalancing checks come every U(0, 2) s
                await _poison(evil, victims.model_id, bad)
            assert auto.proc.poll() is None, auto.output()[-2000:]
            marker = announcement(evil, victims.model_id, start=5, end=6, state="JOINING", timestamp=time.time())
            await evil.pubsub.publish(topic(victims.model_id), signed_raw(evil, marker))
            async with peer(victims) as (_, hswarm):  # the auto server heard the poison, then this
                await hswarm.node.connect(auto.addr, timeout=5)
                with trio.fail_after(15):
                    while (entry := hswarm.table.get(evil.peer_id)) is None or entry.end != 6:
                        await hswarm.fetch_snapshot(auto.peer_id, victims.model_id)
                        await trio.sleep(0.2)
            assert auto.proc.poll() is None, auto.output()[-2000:]
        finally:
            auto.cleanup()
        assert await answers(evil, victims)


async def _poison(evil, model_id: str, bad: list[dict]) -> None:
    for b in bad:
        await evil.pubsub.publish(topic(model_id), signed_raw(evil, b | {"timestamp": time.time()}))
    await trio.sleep(0.5)
