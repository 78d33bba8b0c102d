"""LoRA on spans: equal to peft on the full model (outputs and gradients), saved in peft's format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mesh.model.head import head_from_model
from mesh.model.lora import (DEFAULT_TARGETS, LoraSpec, LoraWeights, default_targets, init_lora, load_peft,
                             save_peft, target_modules)
from mesh.model.span import span_from_model

from conftest import TINY_KINDS, make_tiny


def _logits(model, span, ids, lora):
    head = head_from_model(model)
    h = head.embed(ids)
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    return head.logits(span(h, pos, lora=lora))


def _layers(model):
    base = getattr(model, "model", None) or model.transformer
    return getattr(base, "layers", None) or base.h


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_lora_matches_peft_outputs_and_gradients(tmp_path, kind):
    from peft import PeftModel

    model = make_tiny(kind)
    spec = LoraSpec(rank=4, alpha=8.0, targets=default_targets(model.config))
    lora = init_lora(model.config, spec, 0, 6, torch.Generator().manual_seed(0), zero_b=False)
    save_peft(tmp_path / "adapter", lora, model.config, "tiny")
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))

    flat = [t.clone().requires_grad_(True) for t in lora.tensors()]
    ours = _logits(model, span_from_model(model, 0, 6), ids, LoraWeights.from_tensors(spec, 0, 6, flat))
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2))
    (ours * weights).sum().backward()

    peft_model = PeftModel.from_pretrained(make_tiny(kind), tmp_path / "adapter", is_trainable=True)
    theirs = peft_model(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5)
    (theirs * weights).sum().backward()
    got = LoraWeights.from_tensors(spec, 0, 6, [t.grad for t in flat])
    names = [n for n, _ in target_modules(_layers(model)[0], spec.targets)]
    for i, layer in enumerate(_layers(peft_model.base_model.model)):
        for j, proj in enumerate(layer.get_submodule(n) for n in names):
            ref_a, ref_b = proj.lora_A["default"].weight.grad, proj.lora_B["default"].weight.grad
            assert torch.allclose(got.a[i][j], ref_a, rtol=1e-4, atol=1e-7)
            assert torch.allclose(got.b[i][j], ref_b, rtol=1e-4, atol=1e-7)

    back = load_peft(tmp_path / "adapter", model.config)
    assert all(torch.equal(x, y) for x, y in zip(back.tensors(), lora.tensors()))


def test_default_targets_follow_the_family():
    assert default_targets(make_tiny("llama", layers=1).config) == DEFAULT_TARGETS
    assert default_targets(make_tiny("bloom", layers=1).config) == ("query_key_value",)
    assert default_targets(make_tiny("phi3", layers=1).config) == ("qkv_proj",)
    # `mesh finetune` without --lora-targets adapts the family's default
    from mesh.api.finetune import FinetuneConfig

    cfg = FinetuneConfig(data=Path("data.jsonl"), model="falcon")
    assert cfg.tuning(make_tiny("falcon", layers=1).config).lora.targets == ("query_key_value",)
    assert FinetuneConfig(data=Path("d"), model="m", lora_targets=["o_proj"]).tuning(None).lora.targets == ("o_proj",)


def test_span_backward_returns_lora_and_prompt_gradients():
    model = make_tiny("llama")
    spec = LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))
    lora = init_lora(model.config, spec, 2, 5, torch.Generator().manual_seed(0), zero_b=False)
    span = span_from_model(model, 2, 5)
    g = torch.Generator().manual_seed(3)
    x, grad_out = torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    prompts = torch.randn(3, 1, 2, 64, generator=g)
    pos = torch.arange(7)[None].expand(2, -1)
    got = span.backward(x, grad_out, pos, None, prompts, lora)

    xs = x.clone().requires_grad_(True)
    ps = prompts.clone().requires_grad_(True)
    flat = [t.clone().requires_grad_(True) for t in lora.tensors()]
    out = span(xs, pos, None, None, ps, LoraWeights.from_tensors(spec, 2, 5, flat))
    (out * grad_out).sum().backward()
    assert torch.allclose(got.hidden, xs.grad, atol=1e-6)
    assert torch.allclose(got.prompts, ps.grad, atol=1e-6)
    assert len(got.lora) == len(flat) == 3 * 3 * 2
    for a, b in zip(got.lora, flat):
        assert torch.allclose(a, b.grad, atol=1e-6)
