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
    x, pos = torch.randn(2, 9, 64), torch.arange(9).expand(2, 9)
    ref = load_span(source.path, source.config, 0, 6)(x, pos)
    span = load_span(source.path, source.config, 0, 6, dtype, quantizer(mode, dtype))
    with torch.no_grad():
        out = span(x, pos)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel(out, ref) < 5 * BOUNDS[(mode, dtype)]  # tiny random weights are less smooth than real ones


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


def test_blocks_that_fit_counts_quantized_size(smollm2):
    from mesh.net.server import blocks_that_fit

    linear, other = block_params(smollm2.config)
    assert linear > 10 * other > 0
    fp32 = blocks_that_fit(smollm2, "none", torch.float32, 0.05)
    nf4 = blocks_that_fit(smollm2, "nf4", torch.float32, 0.05)
    assert 2 <= fp32 < nf4 and nf4 >= 5 * fp32
    assert blocks_that_fit(smollm2, "none", torch.float32, None) is None


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(BadRequest, match="unknown quantization"):
        check_quant("int3")
