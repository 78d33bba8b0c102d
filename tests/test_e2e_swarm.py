"""Three `mesh serve` processes on loopback: the swarm table, SIGKILL and SIGTERM, seen from outside.

Two of the three run with their wall clocks two minutes off (behind and ahead), as peers' clocks may be
across the internet: the table's expiry must not depend on them.
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
import trio

from mesh.net.node import NodeConfig, open_node
from mesh.net.announce import ServerState
from mesh.net.swarm import open_swarm

from procs import run_mesh, serve

pytestmark = pytest.mark.e2e


async def test_three_servers_status_kill_and_term(tiny30, tmp_path):
    procs = []
    try:
        first = serve(tiny30, "0:10", tmp_path / "s0.log")
        procs.append(first)
        boot = await first.wait_ready()
        procs += [serve(tiny30, "10:20", tmp_path / "s1.log", [boot], clock_skew=-120),
                  serve(tiny30, "20:30", tmp_path / "s2.log", [boot], clock_skew=+120)]
        for p in procs[1:]:
            await p.wait_ready()
        ready = time.monotonic()
        # a log written to a file keeps each record on one line: the whole address can be read from it
        logged = re.search(r"^\S+ \S+ INFO mesh\.node: node \S+ listening on (\S+)$", first.output(), re.M)
        assert logged and logged.group(1) == boot, first.output()[-2000:]

        async with open_node(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], initial_peers=[boot],
                                        dht_mode="client")) as node, open_swarm(node) as swarm:
            # all three are in the table within 10 s of the last one starting (snapshot + gossip)
            await swarm.discover("tiny30", timeout=5)
            assert await swarm.wait_for(lambda t: len(t.servers("tiny30")) == 3, 10 - (time.monotonic() - ready))

            # and `mesh status --json` (a separate process joining now) shows them covering every block;
            # without a model (second run, at the same time): the table comes from the snapshot alone, then
            # gossip keeps it; an initial peer that cannot be reached is named on stderr with the reason
            dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWGfF2mBkoXqiJwoVaRwm3qTFopm1XreeKQCyvjfMZTyms"
            runs = {}

            async def status(name: str, *args: str) -> None:
                runs[name] = await run_mesh("status", *args, "--json", "--timeout", "5")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(status, "model", "tiny30", "--initial-peers", boot)
                nursery.start_soon(status, "all", "--initial-peers", boot, "--initial-peers", dead)
            result = runs["model"]
            assert result.returncode == 0, result.stdout + result.stderr
            (model,) = json.loads(result.stdout)["models"]
            assert model["covered"]
            assert sorted((s["start"], s["end"]) for s in model["servers"]) == [(0, 10), (10, 20), (20, 30)]
            assert model["servers_per_block"] == [1] * 30
            # each server announces where it computes: `--device auto` is the CPU here, at its float32 default
            assert {(s["device"], s["dtype"], s["quant"]) for s in model["servers"]} == {("cpu", "float32", "none")}
            result = runs["all"]
            assert result.returncode == 0, result.stdout + result.stderr
            (model,) = json.loads(result.stdout)["models"]
            assert model["servers_per_block"] == [1] * 30
            assert f"initial peer {dead} unreachable: " in result.stderr.decode(), result.stderr

            # SIGKILL: no goodbye, the entry expires (ttl = 3 announce periods = 3 s)
            killed = procs[1]
            killed.signal(signal.SIGKILL)
            t0 = time.monotonic()
            gone = await swarm.wait_for(lambda t: t.get(killed.peer_id) is None, timeout=10)
            assert gone and time.monotonic() - t0 < 3 + 2

            # SIGTERM: drain, announce OFFLINE, exit; the table drops it at once
            termed = procs[2]
            termed.signal(signal.SIGTERM)
            t0 = time.monotonic()
            gone = await swarm.wait_for(
                lambda t: t.get(termed.peer_id) is None or t.get(termed.peer_id).state != ServerState.ONLINE, 5)
            assert gone and time.monotonic() - t0 < 2.5  # well before the 3 s expiry: the goodbye arrived
            assert await termed.wait_exit(15) == 0
            assert "state OFFLINE" in termed.output()

        result = await run_mesh("status", "tiny30", "--initial-peers", boot, "--json", "--timeout", "2")
        assert result.returncode == 1  # blocks 10:30 are no longer covered
        (model,) = json.loads(result.stdout)["models"]
        assert model["missing_blocks"] == list(range(10, 30))
    finally:
        for p in procs:
            p.cleanup()
