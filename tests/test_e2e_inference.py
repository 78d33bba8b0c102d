"""Routed inference through three `mesh serve` processes: exact tokens, sessions, and push."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import DistributedModelForCausalLM
from procs import wait_for_servers


pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def swarm_model(tiny30, pool):
    pool.refill()
    with DistributedModelForCausalLM.from_pretrained(str(tiny30), [pool.boot]) as model:
        model.client.call(lambda: wait_for_servers(model, 6))
        yield model


@pytest.fixture(scope="module")
def reference(tiny30):
    return AutoModelForCausalLM.from_pretrained(str(tiny30), dtype=torch.float32).eval()


def prompt(n=12, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_greedy_64_equals_transformers(swarm_model, reference):
    ids = prompt()
    out = swarm_model.generate(ids, max_new_tokens=64)
    ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                             pad_token_id=0)
    assert out.tolist() == ref.tolist()


def test_seeded_sampling_equals_local(swarm_model, reference):
    ids = prompt(seed=1)
    torch.manual_seed(123)
    out = swarm_model.generate(ids, max_new_tokens=24, do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
    torch.manual_seed(123)
    ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=True,
                             temperature=0.8, top_k=40, top_p=0.9, pad_token_id=0)
    assert out.tolist() == ref.tolist()


def test_batch_with_left_padding_equals_transformers(swarm_model, reference):
    ids = torch.cat([prompt(10, 2), prompt(10, 3)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = swarm_model.generate(ids, mask, max_new_tokens=16, repetition_penalty=1.3)
    ref = reference.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                             repetition_penalty=1.3, pad_token_id=0)
    assert out.tolist() == ref.tolist()


def test_two_calls_in_one_session_equal_one_run(swarm_model, reference):
    ids = prompt(seed=4)
    with swarm_model.inference_session(max_length=64) as session:
        first = swarm_model.generate(ids, max_new_tokens=8, session=session)
        extra = prompt(5, seed=5)
        both = swarm_model.generate(extra, max_new_tokens=8, session=session)
    assert torch.equal(both[:, :first.shape[1]], first)
    # one local run over the concatenation: first call's tokens, the extra prompt, then 8 greedy tokens
    whole = torch.cat([first, extra], dim=1)
    ref = reference.generate(whole, attention_mask=torch.ones_like(whole), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)
    assert both.tolist() == ref.tolist()


def test_push_is_used(swarm_model):
    """Per token the client sends one step (to the first server); the others get theirs by push."""
    from mesh.net.client import server_info

    client = swarm_model.client
    with swarm_model.inference_session(max_length=64) as session:
        route = session.remote.route
        before = {h.peer_id: client.call(server_info, client.node, h.peer_id).counters for h in route}
        swarm_model.generate(prompt(seed=6), max_new_tokens=10, session=session)
        after = {h.peer_id: client.call(server_info, client.node, h.peer_id).counters for h in route}
    assert len(route) == 3
    steps = 10  # prefill + 9 single-token steps (the last sampled token is not fed)
    delta = {p: {k: after[p][k] - before[p][k] for k in after[p]} for p in after}
    first, *rest = [delta[h.peer_id] for h in route]
    assert first["steps_from_clients"] == steps and first["steps_from_pushes"] == 0
    for d in rest:
        assert d["steps_from_clients"] == 0 and d["steps_from_pushes"] == steps
    assert [d["pushes_sent"] for d in (first, *rest)] == [steps, steps, 0]


@pytest.mark.slow
def test_demo_answers_through_a_local_swarm():
    result = subprocess.run([sys.executable, "-m", "mesh.cli", "demo"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "[0:10]" in result.stderr and "[20:30]" in result.stderr
