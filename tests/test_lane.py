"""The compute lane: one piece of work at a time, least-served peer first, a decoding peer not starved."""

from __future__ import annotations

import statistics
import time

import pytest
import trio

from mesh.net import wire
from mesh.net.lane import ComputeLane

DECODE, CHUNK = 0.010, 0.030  # s of a decode step, and of a flooding peer's chunk (3 decode steps)


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def decode_steps(lane: ComputeLane, peer: str, n: int) -> list[float]:
    """n short steps, each sent 2 ms after the previous answer (a client's round trip)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await lane.run(lambda: busy(DECODE), tokens=1, peer=peer)
        times.append(time.perf_counter() - t0)
        await trio.sleep(0.002)
    return times


async def test_a_flood_of_long_chunks_leaves_a_decoder_its_half():
    lane = ComputeLane()
    solo = await decode_steps(lane, "honest", 20)

    async def flood(i: int) -> None:
        while True:
            await lane.run(lambda: time.sleep(CHUNK), tokens=16, peer="evil")  # a thread: lets the GIL go, as torch does

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(flood, i)
        await trio.sleep(0.2)
        attacked = await decode_steps(lane, "honest", 40)
        n.cancel_scope.cancel()
    # half the lane is ~2 × solo; without anticipation each step would wait for a whole chunk: 4 × solo
    assert statistics.mean(attacked) < 2.5 * statistics.mean(solo), (statistics.mean(solo), statistics.mean(attacked))
    assert max(attacked) < DECODE + CHUNK + 0.02


async def test_one_peer_cannot_queue_more_than_its_quota_and_cancelled_waits_free_the_lane():
    lane = ComputeLane(queued_tokens_per_peer=100)
    release = trio.Event()

    async def hold() -> None:
        await lane.run(lambda: trio.from_thread.run(release.wait), tokens=60, peer="a")

    async with trio.open_nursery() as n:
        n.start_soon(hold)
        await trio.sleep(0.05)
        with pytest.raises(wire.Busy):
            await lane.run(lambda: None, tokens=60, peer="a")  # 120 tokens of "a" would be queued
        with trio.move_on_after(0.05):  # another peer's wait, cancelled: the lane must not stay taken
            await lane.run(lambda: None, tokens=10, peer="b")
        release.set()
    with trio.fail_after(1):
        assert await lane.run(lambda: 7, tokens=10, peer="b") == 7
