"""A server that answers with malformed or unexpected frames: the client fails that server (ban, reroute,
replay) and its outputs are still exact; it never crashes."""

from __future__ import annotations

import time

import pytest
import torch
import trio

from mesh.balancing.routing import Hop
from mesh.net import wire
from mesh.net.inference import InferenceSession
from mesh.net.announce import ServerInfo, ServerState
from mesh.net.messages import OpenSession, Ping, Pong, SessionOpened, Step, StepResult

from hostile import chain_config, honest_inputs, local_run, peer

pytestmark = pytest.mark.e2e


def _answers(kind: str, step: Step) -> list[object]:
    """What the lying server writes for a step."""
    n = step.hidden.shape[1]
    if kind == "nan":
        return [StepResult(step.step_id, step.position, torch.full((1, n, 64), float("nan"))).to_wire()]
    if kind == "shape":
        return [StepResult(step.step_id, step.position, torch.randn(1, n + 1, 64)).to_wire()]
    if kind == "junk":
        return [{"type": "StepResult", "v": "1.0.0", "step_id": "x", "hidden": 5}, [1, 2], b"\x00"]
    if kind == "error":
        return [{"error": "boom"}, {"error": {"code": "bad_request", "message": "no", "step_id": step.step_id}}]
    raise ValueError(kind)


async def _through_liar_first(honest, hswarm, victims, liar: str) -> torch.Tensor:
    """`honest_inputs()` through a session whose first chain is the liar alone (routing would pick it
    anyway when its RTT is as low as it claims; here it is certain), and the swarm after that."""
    outs, position = [], 0
    async with trio.open_nursery() as nursery:
        session = InferenceSession(chain_config(honest, hswarm, victims), nursery)
        session.hops = await session.opener.open_hops([Hop(liar, 0, 6)], None)
        session._start_readers(session.hops)
        for x in honest_inputs():
            n = x.shape[1]
            outs.append(await session.step(x, torch.arange(position, position + n)[None], None, position))
            position += n
        for link in session.hops:
            await link.close()
        nursery.cancel_scope.cancel()
    return torch.cat(outs, dim=1)


KINDS = ("nan", "shape", "junk", "error")


async def test_a_lying_server_is_routed_around(victims):
    """One liar per kind of lie, each the client's first chain in turn: every lie fails that server."""
    used: list[str] = []
    want = local_run(victims)
    async with peer(victims) as (honest, hswarm):
        for kind in KINDS:
            async with peer(victims) as (liar, lswarm):
                await _lie(liar, lswarm, victims, kind, used)
                with trio.fail_after(10):
                    while hswarm.table.get(liar.peer_id) is None:
                        await trio.sleep(0.1)
                await honest.connect(liar.addrs[0], timeout=5)
                out = await _through_liar_first(honest, hswarm, victims, liar.peer_id)
            torch.testing.assert_close(out, want, rtol=0, atol=1e-5, msg=lambda m: f"{kind}: {m}")
    assert used == list(KINDS), f"the client did not try every liar: {used}"


async def _lie(liar, lswarm, victims, kind: str, used: list[str]) -> None:
    """Make `liar` a server of blocks 0:6, the fastest there is, it says, that answers every step with `kind`."""
    async def handle(stream) -> None:
        used.append(kind)
        OpenSession.from_wire(await wire.read_frame(stream, timeout=10))
        await wire.write_frame(stream, SessionOpened("lie", 64).to_wire())
        while True:
            frame = await wire.read_frame(stream, timeout=30)
            if frame.get("type") != "Step":
                continue
            for answer in _answers(kind, Step.from_wire(frame)):
                await wire.write_frame(stream, answer)

    async def pong(stream) -> None:  # it answers pings like any server, and fast
        while True:
            ping = Ping.from_wire(await wire.read_frame(stream, timeout=30))
            await wire.write_frame(stream, Pong(ping.nonce).to_wire())

    liar.set_handler("inference", handle)
    liar.set_handler("ping", pong)
    await lswarm.announce(ServerInfo(liar.peer_id, victims.model_id, 0, 6, ServerState.ONLINE, timestamp=time.time(),
                                     throughput=1e9, inference_rps=1e9, forward_rps=1e9, network_rps=1e9,
                                     total_blocks=6, cache_tokens_free=10 ** 6))
