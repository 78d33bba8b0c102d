"""A server in this trio run, called over real libp2p: exactness, sessions, budget, bad input."""

from __future__ import annotations

import struct
from contextlib import asynccontextmanager

import pytest
import torch
import trio

from mesh.model.errors import BadRequest, MaxLengthExceeded
from mesh.model.span import load_span
from mesh.net import wire
from mesh.net.client import open_session, ping, remote_backward, remote_forward, server_info
from mesh.net.messages import ForwardRequest, Step, StepResult
from mesh.net.node import NodeConfig, open_node
from mesh.net.server import ServerConfig, run_server
from mesh.net.swarm import open_swarm

from conftest import LOOPBACK


@asynccontextmanager
async def server_and_client(folder, blocks="1:5", **kwargs):
    stop = trio.Event()
    async with trio.open_nursery() as n:
        config = ServerConfig(str(folder), blocks, NodeConfig(listen=LOOPBACK), announce_period=1, **kwargs)
        server = await n.start(lambda task_status: run_server(config, stop=stop, task_status=task_status))
        async with open_node(NodeConfig(listen=LOOPBACK, initial_peers=[server.node.addrs[0]],
                                        dht_mode="client")) as client, open_swarm(client) as swarm:
            await swarm.discover(server.source.model_id, timeout=5)
            (info,) = swarm.table.servers(server.source.model_id)
            yield server, client, info
        stop.set()


def inputs(batch=2, length=9, hidden=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, hidden, generator=g), torch.arange(length).expand(batch, length)


async def step(session, hidden, position_ids, position: int, timeout: float = 60.0) -> torch.Tensor:
    """One step of a one-hop session (its server is the chain's last, so it answers): the output."""
    await session.send(Step(1, position, hidden, position_ids), timeout)
    frame = await wire.read_frame(session.stream, timeout=timeout)
    return StepResult.from_wire(wire.raise_if_error(frame)).hidden


async def test_forward_backward_and_session_equal_local_span(tiny_dirs):
    folder = tiny_dirs["llama"]
    async with server_and_client(folder) as (server, client, info):
        local = load_span(folder, server.source.config, 1, 5)
        x, pos = inputs()
        assert torch.equal(await remote_forward(client, info, 1, 5, x, pos), local(x, pos))
        grad_out = torch.randn_like(x)
        grad = (await remote_backward(client, info, 1, 5, x, grad_out, pos)).hidden
        assert torch.equal(grad, local.backward(x, grad_out, pos)[0])
        sub = local.sub(2, 5)
        cache = sub.new_cache(2, 32)
        async with open_session(client, info, 2, 5, max_length=32, batch_size=2) as session:
            for t in range(4):  # prefill then single-token steps
                chunk = slice(0, 6) if t == 0 else slice(5 + t, 6 + t)
                xs, ps = inputs(length=12)
                got = await step(session, xs[:, chunk], ps[:, chunk], cache.length)
                assert torch.equal(got, sub(xs[:, chunk], ps[:, chunk], cache))
            # a re-sent step (same position) rolls the server back: still exact
            cache.rollback(8)
            got = await step(session, xs[:, 8:9], ps[:, 8:9], 8)
            assert torch.equal(got, sub(xs[:, 8:9], ps[:, 8:9], cache))
        assert (await ping(client, info.peer_id)) < 0.5
        counters = (await server_info(client, info.peer_id)).counters
        assert counters["forwards"] == 1 and counters["backwards"] == 1 and counters["steps_from_clients"] == 5


async def test_two_sessions_budget_and_idle_timeout(tiny_dirs):
    async with server_and_client(tiny_dirs["llama"], cache_tokens=100, idle_timeout=1.0) as (server, client, info):
        x, pos = inputs(batch=1, length=4)
        async with open_session(client, info, 1, 5, max_length=50) as s1, \
                open_session(client, info, 1, 5, max_length=50) as s2:
            a = await step(s1, x, pos, 0)
            b = await step(s2, x * 2, pos, 0)
            assert not torch.equal(a, b)
            assert server.sessions.budget.used == 100
            with pytest.raises(wire.Busy):
                async with open_session(client, info, 1, 5, max_length=10):
                    pass
        # both closed: the budget is free again
        async with open_session(client, info, 1, 5, max_length=100) as s3:
            await step(s3, x, pos, 0)
            await trio.sleep(2.0)  # idle longer than the timeout: the server closes the session
            with pytest.raises(wire.StreamClosed):
                await step(s3, x[:, :1], pos[:, :1] + 4, 4, timeout=5)
        assert server.sessions.budget.used == 0


async def test_bad_requests_get_errors_and_the_server_goes_on(tiny_dirs):
    async with server_and_client(tiny_dirs["llama"]) as (server, client, info):
        x, pos = inputs()

        async def raw(name, payload: bytes):
            async with client.stream(info.peer_id, name) as s:
                await s.write(payload)
                return await wire.read_frame(s, timeout=10)

        garbage = await raw("forward", struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
        assert garbage["error"]["code"] == "bad_request"
        oversized = await raw("forward", struct.pack(">I", 2**31 - 1))
        assert oversized["error"]["code"] == "too_large"
        frame = ForwardRequest(1, 5, x, pos).to_wire()
        local = load_span(tiny_dirs["llama"], server.source.config, 1, 5)
        async with client.stream(info.peer_id, "forward") as s:  # truncated: the server waits for the rest...
            data = wire.pack(frame)
            await s.write(data[: len(data) // 2])
            with trio.fail_after(5):  # ...and meanwhile answers everyone else, exactly
                assert torch.equal(await remote_forward(client, info, 1, 5, x, pos), local(x, pos))
        future = dict(frame, v="9.0.0")
        assert (await raw("forward", wire.pack(future)))["error"]["code"] == "unknown_version"
        with pytest.raises(wire.UnknownVersion):
            async with client.stream(info.peer_id, "forward", version="9.0.0"):
                pass
        with pytest.raises(BadRequest, match="hidden states must be"):
            await remote_forward(client, info, 1, 5, torch.randn(2, 9, 63), pos)
        with pytest.raises(BadRequest, match="outside"):
            await remote_forward(client, info, 0, 5, x, pos)
        async with open_session(client, info, 1, 5, max_length=10, batch_size=2) as session:
            with pytest.raises(MaxLengthExceeded):
                await step(session, *inputs(length=11), 0)
            with pytest.raises(BadRequest, match="expects 5 cached tokens"):
                await step(session, x[:, :1], pos[:, :1], 5)
            out = await step(session, x[:, :3], pos[:, :3], 0)  # the session still works
            assert out.shape == (2, 3, 64)
        with pytest.raises(BadRequest):
            async with open_session(client, info, 1, 5, max_length=10, batch_size=0):
                pass
        # after all that, a correct request is answered exactly
        assert torch.equal(await remote_forward(client, info, 1, 5, x, pos), local(x, pos))
        assert server.sessions.counters.errors == 2  # the session's two bad steps, each answered in the session


async def test_link_probe_and_a_second_server_uses_it(tiny_dirs):
    from mesh.net.client import probe_link

    folder = tiny_dirs["llama"]
    async with server_and_client(folder) as (server, client, info):
        assert not server.measurement.network_measured  # the first server had nobody to probe
        assert await probe_link(client, info.peer_id, nbytes=1 << 18) > 1e6  # loopback: far above 1 Mbit/s
        with pytest.raises(BadRequest, match="outside"):
            from mesh.net.messages import Probe, ProbeReply
            await client.request(info.peer_id, "probe", Probe(b"", 1 << 30), reply=ProbeReply)
        stop = trio.Event()
        async with trio.open_nursery() as n:
            config = ServerConfig(str(folder), "0:2", NodeConfig(listen=LOOPBACK, initial_peers=[server.node.addrs[0]]),
                                  announce_period=1)
            second = await n.start(lambda task_status: run_server(config, stop=stop, task_status=task_status))
            assert second.measurement.network_measured
            assert second.info().network_rps > 1e6 / (64 * 16)
            stop.set()


async def test_hosted_and_sent_lora_adapters_equal_local(tiny_dirs, tmp_path):
    from mesh.model.lora import LoraSpec, init_lora, save_peft
    from mesh.net.adapters import ClientLora
    from mesh.net.wire import AdapterUnknown

    from transformers import AutoConfig

    folder = tiny_dirs["llama"]
    config = AutoConfig.from_pretrained(folder)
    lora = init_lora(config, LoraSpec(rank=2, alpha=4.0), 0, 6, torch.Generator().manual_seed(0), zero_b=False)
    save_peft(tmp_path / "style", lora, config)
    async with server_and_client(folder, adapters=[tmp_path / "style"]) as (server, client, info):
        assert info.adapters == ["style"]
        local = load_span(folder, server.source.config, 1, 5)
        x, pos = inputs()
        want = local(x, pos, lora=lora.sub(1, 5))
        assert not torch.equal(want, local(x, pos))
        hosted = await remote_forward(client, info, 1, 5, x, pos, lora=ClientLora("style"))
        assert torch.equal(hosted, want)
        sent = ClientLora.carrying(lora)
        assert torch.equal(await remote_forward(client, info, 1, 5, x, pos, lora=sent), want)
        assert sent.sent == {(info.peer_id, 1, 5)}  # the next call names it only
        assert torch.equal(await remote_forward(client, info, 1, 5, x, pos, lora=sent), want)
        key = sent.key(1, 5)
        others = ClientLora.carrying(lora)
        for i in range(server.adapters.per_peer):  # as many other adapters as the server keeps of a peer
            others.update(init_lora(server.source.config, LoraSpec(rank=2, alpha=4.0), 0, 6,
                                    torch.Generator().manual_seed(i + 1), zero_b=False))
            await remote_forward(client, info, 1, 5, x, pos, lora=others)
        assert key not in server.adapters._recent and sent.sent == {(info.peer_id, 1, 5)}
        # the client names it, hears adapter_unknown, and resends the weights once
        assert torch.equal(await remote_forward(client, info, 1, 5, x, pos, lora=sent), want)
        assert key in server.adapters._recent
        with pytest.raises(AdapterUnknown):
            await remote_forward(client, info, 1, 5, x, pos, lora=ClientLora("nobody"))


async def test_backward_on_a_kept_graph_equals_a_recomputed_one(tiny_dirs):
    folder = tiny_dirs["llama"]
    async with server_and_client(folder) as (server, client, info):
        x, pos = inputs()
        grad_out = torch.randn_like(x)
        out = await remote_forward(client, info, 1, 5, x, pos, keep="k1")
        assert len(server.graphs._items) == 1
        kept = await remote_backward(client, info, 1, 5, x, grad_out, pos, keep="k1")
        assert len(server.graphs._items) == 0  # used once, then dropped
        fresh = await remote_backward(client, info, 1, 5, x, grad_out, pos)
        assert torch.equal(out, await remote_forward(client, info, 1, 5, x, pos))
        assert torch.allclose(kept.hidden, fresh.hidden, atol=1e-6)
        assert server.training.backwards == 2


async def test_a_rewind_past_a_windowed_cache_is_replayed_on_the_same_server(tiny_dirs, monkeypatch):
    """Gemma 2's windowed layers (window 4, slack 2 here) keep 5 tokens: a step 15 positions back gets the
    typed refusal, and the client rebuilds the hop on that same server from its history, banning no one.
    The output equals the span's on the same tokens."""
    from mesh.model import compat
    from mesh.net.chain import ChainConfig
    from mesh.net.inference import open_inference_session
    from mesh.net.latency import RttTracker
    from mesh.net.swarm import SwarmTable

    monkeypatch.setattr(compat, "ROLLBACK_SLACK", 2)
    folder = tiny_dirs["gemma2"]
    async with server_and_client(folder, blocks="0:6") as (server, client, info):
        table = SwarmTable()
        table.update(info)
        cfg = ChainConfig(client, table, RttTracker(client), info.model_id, 6, max_length=32)
        x, pos = inputs(batch=1, length=20)
        async with open_inference_session(cfg) as session:
            await session.step(x[:, :12], pos[:, :12], None, 0)
            for t in range(12, 20):
                await session.step(x[:, t:t + 1], pos[:, t:t + 1], None, t)
            got = await session.step(x[:, 5:8], pos[:, 5:8], None, 5)
            assert session.recoveries == 1 and not cfg.bans.banned()
            assert [h.peer_id for h in session.route] == [info.peer_id]
        with torch.no_grad():
            ref = load_span(folder, server.source.config, 0, 6)(x[:, :8], pos[:, :8])[:, 5:8]
        assert torch.allclose(got, ref, atol=1e-5)


async def test_concurrent_sessions_keep_their_numbers(tiny_dirs):
    """Six sessions of different lengths decode at once over libp2p, joining late and leaving early: every
    output equals the span's on that session alone (tests/test_batching.py forms batches on purpose)."""
    folder = tiny_dirs["llama"]
    async with server_and_client(folder, blocks="0:6") as (server, client, info):
        local = load_span(folder, server.source.config, 0, 6)
        worst = [0.0]

        async def session(i: int) -> None:
            await trio.sleep(0.05 * (i % 3))  # some join late
            x, pos = inputs(batch=1, length=30, seed=i)
            prompt = 3 + 2 * i
            cache = local.new_cache(1, 32)
            async with open_session(client, info, 0, 6, max_length=32) as s:
                await step(s, x[:, :prompt], pos[:, :prompt], 0)
                with torch.no_grad():
                    local(x[:, :prompt], pos[:, :prompt], cache)
                for t in range(prompt, prompt + 10 + 2 * (i % 3)):  # some leave early
                    got = await step(s, x[:, t:t + 1], pos[:, t:t + 1], t)
                    with torch.no_grad():
                        ref = local(x[:, t:t + 1], pos[:, t:t + 1], cache)
                    worst[0] = max(worst[0], (got - ref).abs().max().item())

        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(session, i)
        assert worst[0] < 1e-5, worst[0]
        assert server.sessions.batcher.stats.rows > 6 * 10
