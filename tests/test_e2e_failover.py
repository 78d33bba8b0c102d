"""A server dies mid-generation: the tokens do not change. Servers are `mesh serve` processes on loopback."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import DistributedModelForCausalLM
from mesh.model.errors import MeshError

from procs import wait_for_servers

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model(pool, tiny30):
    with DistributedModelForCausalLM.from_pretrained(str(tiny30), [pool.boot], route_wait=4.0) as m:
        yield m


@pytest.fixture(scope="module")
def reference(tiny30):
    ref = AutoModelForCausalLM.from_pretrained(str(tiny30), dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False, pad_token_id=0)
    return ids, out


def generate_with_failures(model, pool, ids, kills: dict[int, tuple[int, int]]):
    """Greedy 64 tokens; at token t (key) send signal s to the server in use at hop h: kills[t] = (h, s)."""
    pool.refill()
    with model.inference_session(max_length=128) as session:
        model.client.call(lambda: wait_for_servers(model, 6))
        seen, gaps, last = [0], [], [time.monotonic()]

        def on_token(_):
            now = time.monotonic()
            gaps.append(now - last[0])
            last[0] = now
            seen[0] += 1
            if seen[0] in kills:
                hop, sig = kills[seen[0]]
                pool.by_peer(session.remote.route[hop].peer_id).signal(sig)

        out = model.generate(ids, max_new_tokens=64, session=session, on_token=on_token)
        return out, gaps, session.remote.recoveries


@pytest.mark.parametrize("hop", [0, 1, 2], ids=["first", "middle", "last"])
def test_sigkill_mid_generation_keeps_tokens(model, pool, reference, hop):
    ids, expected = reference
    out, _, recoveries = generate_with_failures(model, pool, ids, {20: (hop, signal.SIGKILL)})
    assert out.tolist() == expected.tolist()
    assert recoveries == 1


def test_two_failures_in_one_generation(model, pool, reference):
    ids, expected = reference
    out, _, recoveries = generate_with_failures(model, pool, ids, {15: (1, signal.SIGKILL), 40: (0, signal.SIGKILL)})
    assert out.tolist() == expected.tolist()
    assert recoveries == 2


def test_sigterm_moves_on_without_a_stall(model, pool, reference):
    ids, expected = reference
    out, gaps, recoveries = generate_with_failures(model, pool, ids, {20: (1, signal.SIGTERM)})
    assert out.tolist() == expected.tolist()
    assert recoveries == 1
    normal = sorted(gaps[1:])[len(gaps) // 2]
    worst = max(gaps[20:])
    print(f"SIGTERM: normal step {normal * 1000:.1f} ms, largest gap after it {worst * 1000:.1f} ms")
    # Moving off the draining server costs a session open and a replay of 20 tokens: a few steps' time,
    # measured at 5-6 normal steps (about 0.1 s). Waiting on it would take its drain timeout (10 s); one
    # step's deadline, seconds.
    assert worst < 8 * normal + 0.3


def test_missing_blocks_fail_clearly(model, pool, reference):
    ids, _ = reference
    pool.refill()
    for p in pool.alive("20:30"):
        p.signal(signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(MeshError, match="blocks 20:30"):
        with model.inference_session(max_length=128) as session:
            model.generate(ids, max_new_tokens=8, session=session)
    assert time.monotonic() - t0 < 4.0 + 15  # the configured wait, plus detection and expiry of the dead
