"""Quantized spans: output error per mode within documented bounds, memory per mode, and sizing by memory."""

from __future__ import annotations

import pytest
import torch

from mesh.model.errors import BadRequest
from mesh.model.quant import check_quant, quantizer, tensor_bytes
from mesh.model.span import block_params, load_span

# relative L2 error of a span's output vs fp32 on real hidden states (documented in model/quant.py)
BOUNDS = {("none", torch.bfloat16): 1e-2, ("int8", torch.float32): 2e-2, ("nf4", torch.float32): 1.5e-1}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("mode, dtype", list(BOUNDS))
def test_tiny_span_per_mode(tiny_dirs, mode, dtype):
    from mesh.model.sources import resolve_model

    source = resolve_model(str(tiny_dirs["llama"]))
    x, pos = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0)), torch.arange(9).expand(2, 9)
    ref = load_span(source.path, source.config, 0, 6)(x, pos)
    span = load_span(source.path, source.config, 0, 6, dtype, quantizer(mode, dtype))
    with torch.no_grad():
        out = span(x, pos)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    print(f"{mode}/{dtype}: relative error {rel(out, ref):.2e}")
    assert rel(out, ref) < BOUNDS[(mode, dtype)], rel(out, ref)


def test_int8_spans_keep_a_graph_through_in_place_additions(tiny_dirs):
    """LLM.int8 returns views; Falcon adds its attention and MLP outputs in place: a training pass (a graph
    kept from a leaf input) still runs, and its input gradient is close to float32's."""
    from mesh.model.sources import resolve_model

    source = resolve_model(str(tiny_dirs["falcon"]))
    x, pos = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0)), torch.arange(9).expand(2, 9)
    grad = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    ref = load_span(source.path, source.config, 0, 6).backward(x, grad, pos).hidden
    got = load_span(source.path, source.config, 0, 6, torch.float32, quantizer("int8", torch.float32)).backward(
        x, grad, pos).hidden
    assert rel(got, ref) < BOUNDS[("int8", torch.float32)]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_mixtral_experts_are_quantized_too(tiny_dirs, mode):
    """A MoE block's experts (most of its weights) are split into linears and quantized with the rest: the
    span shrinks as its linear share says, and its output stays within the mode's bound."""
    from mesh.model.measure import block_bytes
    from mesh.model.quant import LinearExperts, is_fused_experts
    from mesh.model.sources import resolve_model

    source = resolve_model(str(tiny_dirs["mixtral"]))
    x, pos = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0)), torch.arange(9).expand(2, 9)
    full = load_span(source.path, source.config, 0, 6)
    span = load_span(source.path, source.config, 0, 6, torch.float32, quantizer(mode, torch.float32))
    assert not any(is_fused_experts(m) for m in span.modules())
    assert sum(isinstance(m, LinearExperts) for m in span.modules()) == 6
    with torch.no_grad():
        assert rel(span(x, pos), full(x, pos)) < BOUNDS[(mode, torch.float32)]
    linear, other = block_params(source.config)
    assert linear > 2 * other  # the experts count as linear weights
    assert tensor_bytes(span) < 1.1 * 6 * block_bytes(source.config, mode, torch.float32)


@pytest.mark.slow
def test_smollm2_span_error_and_memory_per_mode(smollm2):
    from mesh.model.head import load_head, load_tokenizer

    tok, head = load_tokenizer(smollm2), load_head(smollm2)
    ids = tok("The history of the printing press begins in the fifteenth century, when", return_tensors="pt")["input_ids"]
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        x = load_span(smollm2.path, smollm2.config, 0, 10)(head.embed(ids), pos)  # real hidden states
        exact = load_span(smollm2.path, smollm2.config, 10, 20)
        ref = exact(x, pos)
    sizes = {"float32": tensor_bytes(exact)}
    for (mode, dtype), bound in BOUNDS.items():
        span = load_span(smollm2.path, smollm2.config, 10, 20, dtype, quantizer(mode, dtype))
        with torch.no_grad():
            err = rel(span(x, pos), ref)
        sizes[mode if mode != "none" else str(dtype).removeprefix("torch.")] = tensor_bytes(span)
        print(f"{mode}/{dtype}: relative error {err:.2e}, {tensor_bytes(span) / 1e6:.1f} MB for 10 blocks")
        assert err < bound, (mode, dtype, err)
    print("10-block span bytes:", {k: round(v / 1e6, 1) for k, v in sizes.items()})
    assert sizes["bfloat16"] <= 0.51 * sizes["float32"]
    assert sizes["int8"] <= 0.27 * sizes["float32"]
    assert sizes["nf4"] <= 0.14 * sizes["float32"]


def test_blocks_that_fit_counts_quantized_size_and_cache(smollm2):
    from mesh.net.server import ServerConfig, blocks_that_fit

    linear, other = block_params(smollm2.config)
    assert linear > 10 * other > 0

    def fit(quant: str, gb: float, cache_tokens: int = 1) -> int:
        return blocks_that_fit(smollm2, ServerConfig("smollm2", quant=quant, max_memory_gb=gb,
                                                     cache_tokens=cache_tokens, max_length=1))

    fp32, nf4 = fit("none", 0.05), fit("nf4", 0.05)
    assert 2 <= fp32 < nf4 and nf4 >= 5 * fp32
    # The attention cache counts: 32768 tokens of K and V take 50 MB per SmolLM2 block in float32.
    assert fit("none", 0.5, cache_tokens=32768) < fit("none", 0.5) // 3
    assert fit("none", 100.0) == smollm2.num_blocks and fit("none", 0.001) == 1


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(BadRequest, match="unknown quantization"):
        check_quant("int3")
