"""Fine-tuning gradients through three spans of `mesh serve` processes equal local autograd."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh.model.head import head_from_model
from mesh.model.lora import LoraSpec
from mesh.model.span import span_from_model
from mesh.api.tuning import Adapter, LocalRunner, SwarmRunner, TuningConfig, adapted_logits, lm_loss

from procs import wait_for_servers

pytestmark = pytest.mark.e2e


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def grads(adapter, head, runner, data):
    adapter.zero_grad()
    ids, mask, labels = data
    loss, _ = lm_loss(adapted_logits(head, runner, adapter, ids, mask), labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in adapter.parameters()]


@pytest.mark.parametrize("method", ["prompt", "deep-prompt", "lora"])
def test_adapter_gradients_through_the_swarm_equal_local_autograd(pool, tiny30, method):
    from mesh import DistributedModelForCausalLM

    pool.refill()
    full = AutoModelForCausalLM.from_pretrained(str(tiny30), dtype=torch.float32).eval()
    full.requires_grad_(False)
    tuning = TuningConfig(method, num_prompts=3, lora=LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj")))
    adapter = Adapter(full.config, tuning, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # every parameter non-zero, so every gradient is exercised
        for p in adapter.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    data = batch()
    ref_loss, ref = grads(adapter, head_from_model(full), LocalRunner(span_from_model(full, 0, 30)), data)
    with DistributedModelForCausalLM.from_pretrained(str(tiny30), [pool.boot]) as model:
        model.client.call(lambda: wait_for_servers(model, 6))
        for micro_batch in (4, 2):  # whole batch, then micro-batches of 2 + 1 rows on separate chains
            loss, got = grads(adapter, model.head, SwarmRunner(model, micro_batch=micro_batch), data)
            assert torch.allclose(loss, ref_loss, rtol=1e-6)
            for g, r in zip(got, ref):
                assert r.abs().max() > 0
                assert (g - r).norm() <= 1e-5 * r.norm(), (method, micro_batch, (g - r).norm() / r.norm())
