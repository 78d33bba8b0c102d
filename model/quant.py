"""Quantized weights for server spans: bitsandbytes int8 (LLM.int8) and nf4, applied layer by layer.

`quantizer(mode, dtype)` returns a hook for `load_span`: each decoder layer is quantized right after its
weights are read, so a span never holds more than one full-precision layer next to the quantized ones.
Only the linear layers are quantized; norms and embeddings-free blocks keep the span's dtype.

bitsandbytes quantizes a host weight as it moves it to the device, so layers are quantized straight onto
the device they will run on: the real CUDA kernels on GPUs, bitsandbytes' CPU backend on CPUs. Apple MPS
has nf4 kernels but no int8 ones; asking for int8 there is refused. `auto` (the default) is nf4 on CUDA
when the blocks would not fit at the served dtype (as Petals does), and no quantization otherwise.

Relative error (L2) of SmolLM2 blocks 10:20 on real hidden states vs fp32 (tests/test_quant.py):
bfloat16 3.4e-3, int8 7.4e-3, nf4 5.8e-2. Tensor bytes of those 10 blocks: fp32 141.6 MB, bfloat16
70.8 MB, int8 35.4 MB, nf4 18.3 MB.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from .errors import BadRequest

__all__ = ["check_quant", "resolve_quant", "is_fused_experts", "LinearExperts", "quantize_linears", "quantizer",
           "tensor_bytes", "bytes_per_block"]

QUANT_MODES = ("none", "int8", "nf4")
ON_DEVICE = {"cpu": QUANT_MODES, "cuda": QUANT_MODES, "mps": ("none", "nf4")}  # what bitsandbytes runs where
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold: activations above it go through an fp16 matmul


def check_quant(mode: str, device: torch.device | str | None = None) -> str:
    """The --quant value if known (and, given a device, runnable there), else a BadRequest."""
    if mode not in QUANT_MODES and mode != "auto":
        raise BadRequest(f"unknown quantization {mode!r}", hint=f"one of auto, {', '.join(QUANT_MODES)}")
    kind = torch.device(device).type if device is not None else None
    if kind is not None and mode != "auto" and mode not in ON_DEVICE.get(kind, ("none",)):
        runs = [m for m in ON_DEVICE.get(kind, ("none",)) if m != "none"]
        raise BadRequest(f"bitsandbytes has no {mode} kernels for {kind} devices",
                         hint=f"use --quant {' or '.join(runs + ['none'])}")
    return mode


def resolve_quant(mode: str, device: torch.device, fits_unquantized: bool) -> str:
    """`auto` made concrete: nf4 on CUDA when the blocks would not fit at the served dtype, else none."""
    if mode != "auto":
        return check_quant(mode, device)
    return "nf4" if device.type == "cuda" and not fits_unquantized else "none"


def is_fused_experts(module: nn.Module) -> bool:
    """A mixture-of-experts layer's experts stored as stacked 3-D weights (Mixtral's in transformers 5)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3


class LinearExperts(nn.Module):
    """Fused experts as one pair of nn.Linear per expert, so that bitsandbytes quantizes them like any
    projection (an expert holds most of a MoE block's weights). Same call and result as the fused module:
    each token's hidden state through its top-k experts, weighted by the router."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        experts, double, hidden = fused.gate_up_proj.shape
        self.act_fn = fused.act_fn
        self.gate_up = nn.ModuleList(nn.Linear(hidden, double, bias=False) for _ in range(experts))
        self.down = nn.ModuleList(nn.Linear(double // 2, hidden, bias=False) for _ in range(experts))
        with torch.no_grad():
            for e in range(experts):
                self.gate_up[e].weight = nn.Parameter(fused.gate_up_proj.data[e], requires_grad=False)
                self.down[e].weight = nn.Parameter(fused.down_proj.data[e], requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            gate, up = self.gate_up[e](hidden_states[token]).chunk(2, dim=-1)
            y = self.down[e](self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def quantize_linears(module: nn.Module, mode: str, compute_dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> nn.Module:
    """Replace every nn.Linear inside host `module` by its bitsandbytes counterpart, quantized onto `device`
    (fused experts are split into linears first)."""
    if mode == "none":
        return module
    import bitsandbytes as bnb

    # LLM.int8 logs a cast warning on every call with fp32 inputs; the cast is intended.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    for name, child in list(module.named_children()):
        if is_fused_experts(child):
            child = LinearExperts(child)
            setattr(module, name, child)
        if isinstance(child, nn.Linear):
            w = child.weight.data.to(torch.float32)
            bias = child.bias
            if mode == "int8":
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias is not None,
                                        has_fp16_weights=False, threshold=INT8_THRESHOLD)
                q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                q.register_forward_hook(_own_output)
            else:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
            if bias is not None:
                q.bias = nn.Parameter(bias.data.clone(), requires_grad=False)
            setattr(module, name, q.to(device))  # .to() quantizes
        else:
            quantize_linears(child, mode, compute_dtype, device)
    return module


def _own_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    """LLM.int8's autograd function returns a view, which layers that add to a linear's output in place
    (Falcon's parallel attention and MLP) may not modify while a graph is kept: give them a copy then."""
    return out.clone() if out.requires_grad else None


def quantizer(mode: str, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> Callable[[nn.Module, int], nn.Module] | None:
    """A `load_span` hook quantizing each layer onto `device` as it is loaded (None for mode "none")."""
    check_quant(mode, device)
    if mode == "none":
        return None
    if mode == "auto":
        raise ValueError("resolve_quant() turns auto into a mode first")
    return lambda layer, index: quantize_linears(layer, mode, dtype, device)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer, including quantization state (scales, absmax)."""
    total = 0
    seen: set[int] = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def bytes_per_block(linear_params: int, other_params: int, mode: str, dtype: torch.dtype) -> float:
    """Memory of one block in a mode: linear weights at the mode's width (with scales), the rest at dtype."""
    width = torch.empty(0, dtype=dtype).element_size()
    linear = {"none": width, "int8": 1.0 + 4 / 4096, "nf4": 0.5 + 4 / 64}[check_quant(mode)]
    return linear_params * linear + other_params * width
