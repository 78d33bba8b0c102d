"""What tests/adversarial needs: live servers to attack, an attacker's node, an honest client to compare.

The servers are real `mesh serve` processes (blocks 0:3 and 3:6 of the tiny Llama, small limits so
quotas are reached with little work); the attacker is a libp2p node of its own identity in the test
process, speaking raw frames; the honest client opens a chain through both servers and checks its outputs
against the same blocks run locally.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
import time
from pathlib import Path
from typing import AsyncIterator

import msgpack
import psutil
import torch
import trio

from mesh.model.sources import resolve_model
from mesh.model.span import load_span
from mesh.net import wire
from mesh.net.chain import ChainConfig
from mesh.net.client import server_info
from mesh.net.inference import open_inference_session
from mesh.net.latency import RttTracker
from mesh.net.announce import DOMAIN, ServerInfo, ServerState, SignedInfo
from mesh.net.node import Node, NodeConfig, open_node
from mesh.net.swarm import Swarm, open_swarm, topic

from procs import serve

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
MAX_LENGTH, CACHE_TOKENS = 256, 2048
FRAME_SECONDS = 2.0  # a begun frame must arrive within this (short, so tests see stalled frames dropped)
SPANS = ("0:3", "3:6")


class Victims:
    """Two live servers of the tiny Llama: blocks 0:3 and 3:6."""

    def __init__(self, folder: Path, logs: Path) -> None:
        self.folder = folder
        self.source = resolve_model(str(folder), progress=False)
        self.procs = []
        first = self._start(SPANS[0], logs, [])
        first.wait_ready_sync()
        self._start(SPANS[1], logs, [first.addr]).wait_ready_sync()

    def _start(self, span: str, logs: Path, peers: list[str]):
        p = serve(self.folder, span, logs / f"victim-{span.replace(':', '-')}.log", peers,
                  "--max-length", str(MAX_LENGTH), "--cache-tokens", str(CACHE_TOKENS), "--threads", "1",
                  "--limit", f"frame_seconds={FRAME_SECONDS}")
        self.procs.append(p)
        return p

    @property
    def model_id(self) -> str:
        return self.source.model_id

    @property
    def addrs(self) -> list[str]:
        return [p.addr for p in self.procs]

    @property
    def peer_ids(self) -> list[str]:
        return [p.peer_id for p in self.procs]

    def alive(self) -> bool:
        return all(p.proc.poll() is None for p in self.procs)

    def rss(self) -> list[int]:
        """Resident bytes of each server process."""
        return [psutil.Process(p.pid).memory_info().rss for p in self.procs]

    def log(self, i: int) -> str:
        return self.procs[i].output()

    def cleanup(self) -> None:
        for p in self.procs:
            p.cleanup()


@asynccontextmanager
async def peer(victims: Victims, follow: bool = True) -> AsyncIterator[tuple[Node, Swarm]]:
    """A node of its own identity connected to the victims, with its view of the swarm."""
    async with open_node(NodeConfig(listen=LOOPBACK, initial_peers=victims.addrs[:1])) as node:
        async with open_swarm(node, [victims.model_id] if follow else []) as swarm:
            if follow:
                with trio.fail_after(15):
                    while len(swarm.table.servers(victims.model_id)) < 2:
                        await swarm.discover(victims.model_id, timeout=2)
                        await trio.sleep(0.1)
            for addr in victims.addrs[1:]:
                await node.connect(addr, timeout=5)
            yield node, swarm


async def heard_by_all(swarm: Swarm, victims: Victims, peer_id: str, end: int, timeout: float = 15.0) -> None:
    """Wait until each victim's table holds `peer_id`'s entry ending at block `end` (asked by snapshot):
    proof that the victims received and handled what `peer_id` published before it."""
    with trio.fail_after(timeout):
        for victim in victims.peer_ids:
            while True:
                await swarm.fetch_snapshot(victim, victims.model_id)
                entry = swarm.table.get(peer_id)
                if entry is not None and entry.end == end:
                    break
                await trio.sleep(0.2)
            swarm.table.remove(peer_id)


async def answers(node: Node, victims: Victims) -> bool:
    """Every victim process is up and answers an info call."""
    if not victims.alive():
        return False
    for peer_id in victims.peer_ids:
        await server_info(node, peer_id, timeout=10)
    return True


def chain_config(node: Node, swarm: Swarm, victims: Victims, max_length: int = 64) -> ChainConfig:
    return ChainConfig(node, swarm.table, RttTracker(node), victims.model_id, 6, max_length=max_length,
                       route_wait=5.0)


def honest_inputs(steps: int = 6, prompt: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """A prompt's hidden states, then one token's per step (fixed, so runs compare)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, prompt, 64, generator=g)] + [torch.randn(1, 1, 64, generator=g) for _ in range(steps)]


async def honest_run(node: Node, swarm: Swarm, victims: Victims, inputs: list[torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, list[float]]:
    """The chain's outputs for `honest_inputs()` through a fresh session, and each step's seconds."""
    inputs = inputs or honest_inputs()
    outs, times, position = [], [], 0
    async with open_inference_session(chain_config(node, swarm, victims)) as session:
        for x in inputs:
            n = x.shape[1]
            t0 = trio.current_time()
            outs.append(await session.step(x, torch.arange(position, position + n)[None], None, position))
            times.append(trio.current_time() - t0)
            position += n
    return torch.cat(outs, dim=1), times


def local_run(victims: Victims, inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The same inputs through blocks 0:6 run here: what the swarm must answer."""
    inputs = inputs or honest_inputs()
    span = load_span(victims.source.path, victims.source.config, 0, 6)
    cache = span.new_cache(1, 64)
    outs, position = [], 0
    with torch.no_grad():
        for x in inputs:
            n = x.shape[1]
            outs.append(span(x, torch.arange(position, position + n)[None], cache))
            position += n
    return torch.cat(outs, dim=1)


async def raw_call(node: Node, peer_id: str, protocol: str, frames: list[object], timeout: float = 10.0) -> object:
    """Write `frames` on a new stream and return the first frame the server answers (or the WireError)."""
    async with node.stream(peer_id, protocol, timeout=timeout) as stream:
        for frame in frames:
            await wire.write_frame(stream, frame, timeout=timeout)
        try:
            return await wire.read_frame(stream, timeout=timeout)
        except wire.WireError as e:
            return e


def error_code(reply: object) -> str | None:
    """The code of an error frame (None if the reply is not one)."""
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        return reply["error"].get("code")
    return None


def signed_raw(node, fields: dict) -> bytes:
    """An announcement carrying `fields` as they are (wrong types included), properly signed by `node`."""
    data = msgpack.packb(fields, use_bin_type=True)
    key = node.host.get_private_key()
    return SignedInfo(data, key.get_public_key().serialize(), key.sign(DOMAIN + data)).to_bytes()


def announcement(node, model_id: str, **changes) -> dict:
    info = ServerInfo(node.peer_id, model_id, 0, 6, ServerState.ONLINE, timestamp=time.time(),
                      throughput=10.0, inference_rps=10.0, total_blocks=6).to_wire()
    return info | changes


async def publish(node, swarm, model_id: str, payloads: list[bytes]) -> None:
    await swarm.follow(model_id)
    await trio.sleep(1.2)  # a heartbeat grafts the gossip mesh
    for payload in payloads:
        await node.pubsub.publish(topic(model_id), payload)
