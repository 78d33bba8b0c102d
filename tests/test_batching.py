"""Continuous batching: steps of sessions queued while the lane is busy share its next pass, with each
session's own numbers; steps that cannot share run alone; a lone step runs at once."""

from __future__ import annotations

import threading

import torch
import trio

from mesh.model.batch import Row, batchable, run_rows
from mesh.model.span import span_from_model
from mesh.net.batching import Batcher
from mesh.net.lane import ComputeLane

from conftest import make_tiny


def sessions(span, lengths, seed=0):
    """(cache, local twin cache) per session, both prefilled with the same random prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for n in lengths:
            x = torch.randn(1, n, span.hidden_size, generator=g)
            a, b = span.new_cache(1, 64), span.new_cache(1, 64)
            span(x, torch.arange(n)[None], a)
            span(x, torch.arange(n)[None], b)
            out.append((a, b))
    return out


def test_run_rows_equals_each_session_alone_in_every_family_it_batches():
    for kind in ("llama", "qwen3", "mixtral", "phi3", "falcon", "bloom"):
        span = span_from_model(make_tiny(kind), 0, 6)
        pairs = sessions(span, [3, 11, 1, 7])
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(5):
                xs = [torch.randn(1, 1, span.hidden_size, generator=g) for _ in pairs]
                rows = [Row(a, x, torch.tensor([[a.length]])) for (a, _), x in zip(pairs, xs)]
                assert batchable(span, rows)
                for out, x, (_, b) in zip(run_rows(span, rows), xs, pairs):
                    assert torch.allclose(out, span(x, torch.tensor([[b.length]]), b), atol=1e-5), kind
        assert all(a.length == b.length == n + 5 for (a, b), n in zip(pairs, [3, 11, 1, 7]))


def test_windowed_caches_run_alone():
    span = span_from_model(make_tiny("gemma2"), 0, 6)
    (a, _), (c, _) = sessions(span, [3, 5])
    x = torch.randn(1, 1, span.hidden_size)
    assert not batchable(span, [Row(a, x, torch.tensor([[3]])), Row(c, x, torch.tensor([[5]]))])


async def test_steps_queued_behind_a_busy_lane_share_one_pass():
    span = span_from_model(make_tiny("llama"), 0, 6)
    lane = ComputeLane()
    batcher = Batcher(lane)
    pairs = sessions(span, [2, 9, 4, 6, 1])
    release = threading.Event()
    outs: dict[int, torch.Tensor] = {}
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 1, span.hidden_size, generator=g) for _ in pairs]

    async def one(i: int) -> None:
        a, _ = pairs[i]
        outs[i] = await batcher.run(span, Row(a, xs[i], torch.tensor([[a.length]])), None, f"peer{i}")

    async with trio.open_nursery() as n:
        n.start_soon(lambda: lane.run(lambda: release.wait(10), None, "busy"))
        await trio.sleep(0.05)
        for i in range(len(pairs)):
            n.start_soon(one, i)
        with trio.fail_after(5):
            while batcher.queued < len(pairs):
                await trio.sleep(0.01)
        release.set()
    assert (batcher.stats.passes, batcher.stats.rows) == (1, 5)
    with torch.no_grad():
        for i, (_, b) in enumerate(pairs):
            assert torch.allclose(outs[i], span(xs[i], torch.tensor([[b.length]]), b), atol=1e-5)

    # a lone step runs at once
    a, _ = pairs[0]
    with trio.fail_after(5):
        await batcher.run(span, Row(a, xs[0], torch.tensor([[a.length]])), None, "peer0")
    assert (batcher.stats.passes, batcher.stats.rows) == (2, 6)
