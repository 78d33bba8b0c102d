"""Concurrent clients on the shared pool of `mesh serve` processes: eight at once each get transformers'
greedy tokens, and a 2000-token prompt does not stall the clients decoding beside it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import DistributedModelForCausalLM

from procs import wait_for_servers

pytestmark = pytest.mark.e2e

CLIENTS, NEW_TOKENS = 8, 24


def test_eight_concurrent_clients_each_get_transformers_tokens(pool, tiny30):
    """Prompts of 4 to 25 tokens, clients starting 50 ms apart (so they join the servers' passes at
    different steps) and leaving as they finish; every session on its own route through two replicas
    per span."""
    pool.refill()
    ref = AutoModelForCausalLM.from_pretrained(str(tiny30), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (1, 4 + 3 * i), generator=g) for i in range(CLIENTS)]
    expected = [ref.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0) for p in prompts]
    with DistributedModelForCausalLM.from_pretrained(str(tiny30), [pool.boot], route_wait=10.0) as model:
        assert model.client.call(lambda: wait_for_servers(model, 6))

        def client(i: int) -> torch.Tensor:
            time.sleep(0.05 * i)
            with model.inference_session(max_length=64) as session:
                return model.generate(prompts[i], max_new_tokens=NEW_TOKENS, eos_token_id=[], session=session)

        with ThreadPoolExecutor(CLIENTS) as threads:
            outputs = list(threads.map(client, range(CLIENTS)))
    for i, (out, want) in enumerate(zip(outputs, expected)):
        assert out.tolist() == want.tolist(), i


def test_a_long_prompt_does_not_stall_decoding_clients(pool, tiny30):
    """While one client prefills 2000 tokens, three others decode: the servers cut the prompt into chunks
    between their steps, so each decoder keeps going, its longest gap a small part of the prefill's time."""
    pool.refill()
    g = torch.Generator().manual_seed(6)
    with DistributedModelForCausalLM.from_pretrained(str(tiny30), [pool.boot], route_wait=10.0) as model:
        assert model.client.call(lambda: wait_for_servers(model, 6))
        stamps: list[list[float]] = [[] for _ in range(3)]
        prefill: list[float] = []

        def decoder(i: int) -> None:
            ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(i))
            with model.inference_session(max_length=200) as session:
                model.generate(ids, max_new_tokens=150, eos_token_id=[], session=session,
                               on_token=lambda _: stamps[i].append(time.monotonic()))

        def long_prompt() -> None:
            time.sleep(0.5)  # the decoders are under way
            ids = torch.randint(3, 128, (1, 2000), generator=g)
            with model.inference_session(max_length=2010) as session:
                t0 = time.monotonic()
                model.generate(ids, max_new_tokens=1, eos_token_id=[], session=session)
                prefill.extend([t0, time.monotonic()])

        with ThreadPoolExecutor(4) as threads:
            for done in [threads.submit(decoder, i) for i in range(3)] + [threads.submit(long_prompt)]:
                done.result()
    a, b = prefill
    for s in stamps:
        during = [t for t in s if a <= t <= b]
        gaps = [y - x for x, y in zip(s, s[1:]) if a <= y and x <= b]
        print(f"prefill {b - a:.2f} s; a decoder made {len(during)} steps meanwhile, longest gap {max(gaps):.3f} s")
        assert len(during) >= 3 and max(gaps) < (b - a) / 3
