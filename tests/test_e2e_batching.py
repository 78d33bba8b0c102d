"""Eight clients at once on the shared pool of `mesh serve` processes: their decode steps share passes on
the servers, and each client's greedy tokens equal transformers' own for its prompt."""

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
