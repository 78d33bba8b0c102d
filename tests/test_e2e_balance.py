"""Four `mesh serve --blocks auto` processes of SmolLM2 place themselves, and cover a dead server's blocks."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
import trio

from mesh.model.measure import block_bytes, cache_bytes_per_block, work_bytes
from mesh.net.node import NodeConfig, open_node
from mesh.net.swarm import open_swarm

from procs import run_mesh, serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BLOCKS = 30
PER_SERVER = 12
CACHE_TOKENS, MAX_LENGTH = 2048, 512
PERIOD = 1.0  # mean seconds between rebalancing checks: one check every U(0, 2) s


def covered(table, model_id: str) -> bool:
    return all(table.coverage(model_id, BLOCKS))


async def test_auto_servers_cover_the_model_and_heal_after_a_kill(smollm2, tmp_path):
    per_block = (block_bytes(smollm2.config, "none", torch.float32)
                 + cache_bytes_per_block(smollm2.config, CACHE_TOKENS, torch.float32))
    budget = (PER_SERVER + 0.5) * per_block + work_bytes(smollm2.config, MAX_LENGTH, torch.float32)
    args = ["--max-memory", f"{budget / 1e9:.4f}", "--cache-tokens", str(CACHE_TOKENS), "--max-length",
            str(MAX_LENGTH), "--balance-period", str(PERIOD), "--join-delay", "0.2"]
    procs = []
    try:
        first = serve("smollm2", "auto", tmp_path / "s0.log", [], *args)
        procs.append(first)
        boot = await first.wait_ready(120)
        for i in range(1, 4):  # one after another, no hint but the bootstrap address
            procs.append(serve("smollm2", "auto", tmp_path / f"s{i}.log", [boot], *args))
            await procs[-1].wait_ready(120)

        async with open_node(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], initial_peers=[boot],
                                        dht_mode="client")) as node, open_swarm(node) as swarm:
            mid = smollm2.model_id
            await swarm.discover(mid, timeout=5)
            assert await swarm.wait_for(lambda t: len(t.servers(mid)) == 4 and covered(t, mid), 20)
            spans = {i.peer_id: (i.start, i.end) for i in swarm.table.servers(mid)}
            assert all(b - a == PER_SERVER for a, b in spans.values()), spans
            await trio.sleep(4 * PERIOD)  # two rebalancing periods: a swarm that cannot do better stays put
            assert not any("rebalancing: moving" in p.output() for p in procs)
            assert {i.peer_id: (i.start, i.end) for i in swarm.table.servers(mid)} == spans

            # Kill a server that alone holds some blocks.
            def alone(peer: str) -> list[int]:
                return [b for b in range(*spans[peer])
                        if sum(a <= b < e for p, (a, e) in spans.items() if p != peer) == 0]

            victim = next(p for p in procs if alone(p.peer_id))
            lost = alone(victim.peer_id)
            victim.signal(signal.SIGKILL)
            assert await swarm.wait_for(lambda t: t.get(victim.peer_id) is None, 10)  # expired: 3 s silence
            assert not covered(swarm.table, mid)
            t0 = time.monotonic()
            # Another server moves within 2 rebalancing periods (2 × 2 × PERIOD s, checks are U(0, 2 PERIOD))
            # plus its second look (≤ 1.5 s) and loading the new blocks.
            healed = await swarm.wait_for(lambda t: covered(t, mid), 4 * PERIOD + 1.5 + 10)
            took = time.monotonic() - t0
            assert healed, f"blocks {lost} still uncovered: {[(i.start, i.end) for i in swarm.table.servers(mid)]}"
            movers = [p for p in procs if p is not victim and "rebalancing: moving" in p.output()]
            assert movers, "nobody logged a move"
            print(f"covered again {took:.1f} s after the expiry by {len(movers)} move(s)")

        peer = procs[1].addr if victim is first else boot
        result = await run_mesh("status", "smollm2", "--initial-peers", peer, "--json", "--timeout", "5")
        assert result.returncode == 0, result.stdout + result.stderr
        (model,) = json.loads(result.stdout)["models"]
        assert model["covered"] and len(model["servers"]) == 3
        per_block = model["throughput_per_block"]
        assert len(per_block) == BLOCKS and min(per_block) > 0
        shown = await run_mesh("status", "smollm2", "--initial-peers", peer, "--timeout", "5")
        text = shown.stdout.decode()
        assert shown.returncode == 0 and "tokens/s per block: 0:" in text, text + shown.stderr.decode()
        assert "bottleneck: blocks" in text
    finally:
        for p in procs:
            p.cleanup()
