"""An honest client's decode step while one attacker peer floods the server it uses.

Starts one `mesh serve` of SmolLM2-135M-Instruct (all 30 blocks, one compute thread, a cache of 8192
tokens: a volunteer's small server, of which one peer may hold half, ~190 MiB of attention cache) on
loopback. The
honest client (its own node) prefills 16 tokens' hidden states and times DECODE single-token steps,
first alone, then while one attacker peer (another node of its own identity) at once:
- re-sends a 512-token prefill on each of 8 sessions (its whole cache share), as fast as the server answers;
- begins 8 MiB frames on 6 streams and stalls halfway, again when dropped (larger ones would use up its
  own budget of frame bytes in flight and stall its prefills);
- publishes signed and malformed announcements on the model's gossip topic, ~200 a second.
It prints the decode step's median and p95 solo and under attack, their ratio (target ≤ 2), and the
server's resident memory before and after (target: growth ≤ 200 MiB).

    .venv/bin/python bench/abuse.py [--decode 40] [--max-length 512] [--attack prefill,stall,gossip]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import struct
import time

import msgpack
import psutil
import torch
import trio

from mesh.cli.localswarm import LocalSwarm
from mesh.model.sources import resolve_model
from mesh.net import wire
from mesh.net.announce import ServerInfo, ServerState, SignedInfo
from mesh.net.chain import ChainConfig
from mesh.net.client import server_info
from mesh.net.inference import open_inference_session
from mesh.net.latency import RttTracker
from mesh.net.messages import OpenSession, Step
from mesh.net.node import NodeConfig, open_node
from mesh.net.swarm import open_swarm, topic

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
MiB = 1 << 20
CACHE_TOKENS = 8192
STALLED_FRAME = 8 * MiB  # six of them leave room in the attacker's frame budget for its prefills


async def honest_steps(cfg: ChainConfig, decode: int, hidden: int) -> list[float]:
    """Seconds of each decode step after a 16-token prefill."""
    g = torch.Generator().manual_seed(0)
    times = []
    async with open_inference_session(cfg) as session:
        await session.step(torch.randn(1, 16, hidden, generator=g), torch.arange(16)[None], None, 0)
        for i in range(decode):
            t0 = time.perf_counter()
            await session.step(torch.randn(1, 1, hidden, generator=g), torch.tensor([[16 + i]]), None, 16 + i)
            times.append(time.perf_counter() - t0)
    return times


class Tally:
    """What the attacker got done, so the report shows the flood was real."""

    def __init__(self) -> None:
        self.prefills = self.refused = self.stalls_dropped = self.announcements = 0


async def flood_prefills(node, server: str, max_length: int, hidden: int, tally: Tally) -> None:
    """One session re-sending a max_length prefill (position 0: the server rolls its cache back each time)."""
    x = torch.randn(1, max_length, hidden)
    frame = Step(1, 0, x, torch.arange(max_length)[None]).to_wire()
    async with node.stream(server, "inference", timeout=10) as stream:
        await wire.write_frame(stream, OpenSession(0, 30, max_length).to_wire())
        reply = await wire.read_frame(stream, timeout=10)
        if "error" in reply:
            print(f"  attacker session refused: {reply['error'].get('message')}")
            return
        while True:
            await wire.write_frame(stream, frame, timeout=60)
            answer = await wire.read_frame(stream, timeout=60)
            if "error" in answer:
                tally.refused += 1
            else:
                tally.prefills += 1


async def stall_frames(node, server: str, size: int, tally: Tally) -> None:
    """Begin a frame of `size` bytes, send half, stall until the server drops it; again."""
    while True:
        try:
            async with node.stream(server, "forward", timeout=10) as stream:
                await stream.write(struct.pack(">I", size) + bytes(size // 2))
                await wire.read_frame(stream, timeout=120)
                tally.stalls_dropped += 1
        except Exception:
            await trio.sleep(0.1)


async def spam_gossip(node, swarm, model_id: str, tally: Tally) -> None:
    """Signed announcements of made-up spans at a high rate, and malformed ones between them."""
    await swarm.follow(model_id)
    key = node.host.get_private_key()
    i = 0
    while True:
        i += 1
        info = ServerInfo(node.peer_id, model_id, i % 29, i % 29 + 1, ServerState.ONLINE, throughput=1e300,
                          timestamp=time.time(), ttl=1e18)
        for payload in (SignedInfo.sign(info, key).to_bytes(), msgpack.packb({"peer_id": node.peer_id, "addrs": 5}),
                        b"\x00" * 1000):
            try:
                await node.pubsub.publish(topic(model_id), payload)
                tally.announcements += 1
            except Exception:
                pass
        await trio.sleep(1 / 70)


def quantiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def run(swarm_peers: list[str], pid: int, args) -> None:
    source = resolve_model("smollm2", progress=False)
    hidden = source.config.hidden_size
    async with open_node(NodeConfig(listen=LOOPBACK, initial_peers=swarm_peers)) as honest, \
            open_swarm(honest, [source.model_id]) as hswarm, \
            open_node(NodeConfig(listen=LOOPBACK, initial_peers=swarm_peers)) as evil, \
            open_swarm(evil, [source.model_id]) as eswarm:
        await hswarm.discover(source.model_id, timeout=10)
        with trio.fail_after(30):
            while not hswarm.table.servers(source.model_id):
                await trio.sleep(0.2)
        server = hswarm.table.servers(source.model_id)[0].peer_id
        cfg = ChainConfig(honest, hswarm.table, RttTracker(honest), source.model_id, 30, max_length=256)
        await honest_steps(cfg, 5, hidden)  # warm-up
        rss0 = psutil.Process(pid).memory_info().rss
        solo = await honest_steps(cfg, args.decode, hidden)
        tally = Tally()
        async with trio.open_nursery() as n:
            if "prefill" in args.attack:
                for _ in range(8):
                    n.start_soon(flood_prefills, evil, server, args.max_length, hidden, tally)
            if "stall" in args.attack:
                for _ in range(6):
                    n.start_soon(stall_frames, evil, server, STALLED_FRAME, tally)
            if "gossip" in args.attack:
                n.start_soon(spam_gossip, evil, eswarm, source.model_id, tally)
            await trio.sleep(3.0)  # the flood is under way
            before = tally.prefills
            lane0 = (await server_info(honest, server)).counters["compute_seconds"]
            t0 = time.perf_counter()
            attacked = await honest_steps(cfg, args.decode, hidden)
            during = time.perf_counter() - t0
            lane_busy = (await server_info(honest, server)).counters["compute_seconds"] - lane0
            peak = psutil.Process(pid).memory_info().rss
            n.cancel_scope.cancel()
    (s50, s95), (a50, a95) = quantiles(solo), quantiles(attacked)
    print(f"decode step solo:         median {s50 * 1e3:6.1f} ms, p95 {s95 * 1e3:6.1f} ms ({len(solo)} steps)")
    print(f"decode step under attack: median {a50 * 1e3:6.1f} ms, p95 {a95 * 1e3:6.1f} ms")
    print(f"ratio attacked / solo:    median {a50 / s50:.2f}x, mean {statistics.mean(attacked) / statistics.mean(solo):.2f}x, "
          f"p95 {a95 / s95:.2f}x (target <= 2x)")
    honest_lane = len(attacked) * s50  # the honest steps' compute: at most their solo time each
    print(f"server lane busy {lane_busy:.1f} s of the {during:.1f} s the honest run took (the attacker's share is "
          f"at least {max(0.0, lane_busy - honest_lane):.1f} s)")
    print(f"attacker: {tally.prefills - before} prefills of {args.max_length} tokens served during the honest "
          f"run ({during:.1f} s), {tally.refused} refused; {tally.stalls_dropped} stalled frames dropped; "
          f"{tally.announcements} announcements published")
    print(f"server RSS: {rss0 / MiB:.0f} MiB before, {peak / MiB:.0f} MiB under attack: growth "
          f"{(peak - rss0) / MiB:.0f} MiB (target <= 200 MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode", type=int, default=40, help="decode steps timed, solo and under attack")
    parser.add_argument("--max-length", type=int, default=512, help="tokens of each attacker prefill")
    parser.add_argument("--attack", default="prefill,stall,gossip", help="which floods, comma-separated")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with LocalSwarm("smollm2", 30, servers=1, extra=["--threads", "1", "--cache-tokens", str(CACHE_TOKENS)]) as swarm:
        pid = swarm.procs[0].pid
        trio.run(run, swarm.initial_peers, pid, args)


if __name__ == "__main__":
    main()
