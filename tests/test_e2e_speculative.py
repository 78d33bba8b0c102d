"""Speculative decoding through three `mesh serve` processes: the same greedy tokens as transformers,
rejected drafts rolled back on every server, and a server killed mid-generation."""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import DistributedModelForCausalLM
from mesh.net.client import server_info
from procs import wait_for_servers

pytestmark = pytest.mark.e2e

REPETITIVE = torch.tensor([[5, 17, 42, 99, 3, 64, 8, 21] * 3 + [5, 17, 42]])


def random_prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model(pool, tiny30):
    pool.refill()
    with DistributedModelForCausalLM.from_pretrained(str(tiny30), [pool.boot], route_wait=4.0) as m:
        m.client.call(lambda: wait_for_servers(m, 6))
        yield m
        m.use_speculation("off")


@pytest.fixture(scope="module")
def reference(tiny30):
    return AutoModelForCausalLM.from_pretrained(str(tiny30), dtype=torch.float32).eval()


def expected(reference, ids: torch.Tensor, n: int) -> list[list[int]]:
    return reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0).tolist()


@pytest.mark.parametrize("mode", ["auto", 4])
def test_greedy_with_speculation_equals_transformers(model, reference, mode):
    model.use_speculation(mode)
    for ids in (REPETITIVE, random_prompt(0), random_prompt(3)):
        with model.inference_session(max_length=ids.shape[1] + 48) as session:
            out = model.generate(ids, max_new_tokens=48, session=session)
            spec = session.generator.speculator
        assert out.tolist() == expected(reference, ids, 48)
        assert spec.tokens == 48
        if ids is REPETITIVE:  # prompt lookup drafts here, and the chain accepts some: fewer passes than tokens
            assert spec.accepted > 0 and spec.passes < 48, spec.summary()


def test_every_server_rolls_back_to_the_accepted_length(model, reference):
    """After each pass, every server of the chain holds exactly the accepted tokens plus what the pass fed:
    the drafts the previous pass got wrong are gone from every cache."""
    model.use_speculation(4)
    seen: list[tuple[int, int, list[list[int]]]] = []  # (position, fed, each server's session lengths)
    with model.inference_session(max_length=80) as session:
        run = session.run_blocks

        def run_blocks(hidden, position_ids, mask, position):
            out = run(hidden, position_ids, mask, position)
            infos = [model.client.call(server_info, model.client.node, hop.peer_id) for hop in session.remote.route]
            seen.append((position, hidden.shape[1], [i.session_lengths for i in infos]))
            return out

        session.generator.run_blocks = run_blocks
        out = model.generate(REPETITIVE, max_new_tokens=40, session=session)
        spec = session.generator.speculator
    assert out.tolist() == expected(reference, REPETITIVE, 40)
    for position, fed, lengths in seen:
        assert lengths == [[position + fed]] * 3, (position, fed, lengths)
    rollbacks = sum(now[0] < before[0] + before[1] for before, now in zip(seen, seen[1:]))
    assert rollbacks > 0 and 0 < spec.accepted < spec.drafted, spec.summary()


def test_server_killed_mid_generation_with_speculation(model, pool, reference):
    model.use_speculation("auto")
    pool.refill()
    model.client.call(lambda: wait_for_servers(model, 6))
    with model.inference_session(max_length=REPETITIVE.shape[1] + 48) as session:
        seen = [0]

        def on_token(_):
            seen[0] += 1
            if seen[0] == 20:
                pool.by_peer(session.remote.route[1].peer_id).signal(signal.SIGKILL)

        out = model.generate(REPETITIVE, max_new_tokens=48, session=session, on_token=on_token)
        recoveries = session.remote.recoveries
    assert out.tolist() == expected(reference, REPETITIVE, 48)
    assert recoveries == 1
