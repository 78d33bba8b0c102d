"""A span: blocks [start, end) of one model that run on their own, with their own attention cache.

Built from transformers' own layer classes (through `compat`), so a span gives exactly what the same
blocks give inside the full model. Used by servers (inference sessions, forward, backward) and by the
local reference run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn
from transformers import PretrainedConfig

from . import compat
from .errors import BadRequest, MaxLengthExceeded, SpanOutOfRange
from .lora import LoraWeights
from .lora import applied as lora_applied
from .quant import is_fused_experts
from .weights import Checkpoint, Fetch, read_block

__all__ = ["SpanCache", "SpanGrads", "Graph", "Span", "check_range", "load_span", "span_from_model",
           "block_params"]

# Called on each freshly loaded layer (e.g. to quantize its linear layers); returns the layer to use.
LayerHook = Callable[[nn.Module, int], nn.Module]


@dataclass
class SpanCache:
    """KV cache of one session on one span, plus the 2-D attention mask of every token it holds."""

    batch_size: int
    max_length: int
    first_layer: int
    kv: object = field(repr=False)
    mask: torch.Tensor = field(repr=False)  # [batch, length], 1 = real token

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def rollback(self, length: int) -> None:
        """Keep the first `length` tokens (speculative decoding, re-sent steps after a failover)."""
        if not 0 <= length <= self.length:
            raise BadRequest(f"cannot roll back a cache of {self.length} tokens to {length}")
        compat.kv_crop(self.kv, self.length - length)
        self.mask = self.mask[:, :length]

    def start_at(self, position: int) -> None:
        """Before a step at `position`: drop what it replaces (a re-sent step, rejected drafts). A cache
        that holds fewer tokens cannot be filled from here: the caller must replay them."""
        if position < 0:
            raise BadRequest("negative position")
        if position > self.length:
            raise BadRequest(f"step expects {position} cached tokens but the cache holds {self.length}",
                             hint="replay the missing tokens")
        if self.length > position:
            self.rollback(position)


class SpanGrads(NamedTuple):
    """What a span's backward returns: the input's gradient, and those of prompts and LoRA tensors."""

    hidden: torch.Tensor
    prompts: torch.Tensor | None
    lora: list[torch.Tensor] | None  # in LoraWeights.tensors() order

    def to(self, device: torch.device, dtype: torch.dtype) -> "SpanGrads":
        """On `device`, input and prompt gradients at `dtype` (LoRA ones stay float32)."""
        return SpanGrads(self.hidden.to(device, dtype),
                         self.prompts.to(device, dtype) if self.prompts is not None else None,
                         [g.to(device) for g in self.lora] if self.lora is not None else None)


@dataclass
class Graph:
    """A span's output with its autograd graph, and the leaves whose gradients a backward returns."""

    output: torch.Tensor
    hidden: torch.Tensor
    prompts: torch.Tensor | None
    lora: list[torch.Tensor] | None

    def backward(self, grad_output: torch.Tensor) -> SpanGrads:
        inputs = [self.hidden] + ([self.prompts] if self.prompts is not None else []) + (self.lora or [])
        grads = torch.autograd.grad(self.output, inputs, grad_output.to(self.output.device, self.output.dtype),
                                    allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, inputs)]
        k = 2 if self.prompts is not None else 1
        return SpanGrads(grads[0], grads[1] if self.prompts is not None else None,
                         grads[k:] if self.lora is not None else None)


class Span(nn.Module):
    """Blocks [start, end) of a model with `forward` (with or without cache) and `backward`.

    Inputs may come from any device (the wire decodes to the host); the span moves them to the device its
    weights live on, and its outputs stay there until the caller sends them on."""

    def __init__(self, config: PretrainedConfig, start: int, end: int, layers: list[nn.Module],
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.config = compat.ensure_attention(config)
        self.start, self.end = start, end
        self.dtype = dtype
        self.family = compat.family_of(config)
        self.layers = nn.ModuleList(layers)
        self.device = next((p.device for p in self.layers.parameters()), torch.device("cpu"))
        self.runner = compat.LayerRunner(self.family, config, first_layer=start, end_layer=end)
        self.requires_grad_(False)
        self.eval()

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def sub(self, start: int, end: int) -> "Span":
        """Blocks [start, end) of this span, sharing its weights (a route may use part of a server)."""
        if (start, end) == (self.start, self.end):
            return self
        if not self.start <= start < end <= self.end:
            raise SpanOutOfRange(f"blocks {start}:{end} are outside this span {self.start}:{self.end}")
        layers = list(self.layers[start - self.start:end - self.start])
        return Span(self.config, start, end, layers, self.dtype)

    def new_cache(self, batch_size: int, max_length: int) -> SpanCache:
        if batch_size < 1 or max_length < 1:
            raise BadRequest(f"bad cache shape: batch {batch_size}, max_length {max_length}")
        return SpanCache(batch_size, max_length, self.start, compat.new_kv_cache(self.config, self.end),
                         torch.ones(batch_size, 0, dtype=torch.long, device=self.device))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: SpanCache | None = None,
                attention_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
                lora: LoraWeights | None = None) -> torch.Tensor:
        """Run the span.

        hidden [B, T, H]; position_ids [B, T] (the caller owns positions); attention_mask [B, T] for the
        new tokens only (1 keep, 0 pad) or None for all ones; the cache keeps the mask history itself.
        prompts [n_blocks, B or 1, P, H] (deep prompt tuning): added to the first P positions before each block.
        lora: adapters for exactly this span's blocks, applied to their projections for this call.
        """
        self.check(hidden, position_ids, attention_mask, cache)
        batch, new = hidden.shape[:2]
        new_mask = (attention_mask.to(self.device, torch.long) if attention_mask is not None
                    else torch.ones(batch, new, dtype=torch.long, device=self.device))
        if cache is not None:
            full_mask = torch.cat([cache.mask, new_mask], dim=1)
        else:
            full_mask = new_mask
        hidden = hidden.to(self.device, self.dtype)
        position_ids = position_ids.to(self.device)
        kv = cache.kv if cache is not None else None
        prepared = self.runner.prepare(hidden, position_ids, kv, full_mask)
        if prompts is not None and (prompts.dim() != 4 or prompts.shape[0] != self.num_blocks
                                    or prompts.shape[1] not in (1, batch) or prompts.shape[2] > new
                                    or prompts.shape[3] != self.hidden_size):
            raise BadRequest(f"prompts must be [{self.num_blocks}, 1 or {batch}, ≤{new}, {self.hidden_size}], "
                             f"got {list(prompts.shape)}")
        with lora_applied(self.layers, lora):
            for i, layer in enumerate(self.layers):
                if prompts is not None:
                    p = prompts[i].to(self.device, hidden.dtype)
                    hidden = torch.cat([hidden[:, : p.shape[1]] + p, hidden[:, p.shape[1]:]], dim=1)
                hidden = self.runner.call(layer, hidden, position_ids, kv, prepared, self.start + i)
        if cache is not None:
            cache.mask = full_mask
        return hidden

    def backward(self, hidden: torch.Tensor, grad_output: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
                 lora: LoraWeights | None = None) -> "SpanGrads":
        """Gradients of <output, grad_output> w.r.t. the input hidden states, deep prompts and LoRA."""
        return self.forward_with_graph(hidden, position_ids, attention_mask, prompts, lora).backward(grad_output)

    def forward_with_graph(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
                           lora: LoraWeights | None = None) -> "Graph":
        """A forward pass that keeps what its backward needs, so the backward does not recompute it."""
        with torch.enable_grad():
            x = hidden.detach().to(self.device, self.dtype).requires_grad_(True)
            p = prompts.detach().to(self.device, self.dtype).requires_grad_(True) if prompts is not None else None
            adapters = None
            if lora is not None:
                flat = [t.detach().to(self.device, torch.float32).requires_grad_(True) for t in lora.tensors()]
                adapters = LoraWeights.from_tensors(lora.spec, lora.start, lora.end, flat)
            out = self.forward(x, position_ids, None, attention_mask, p, adapters)
        return Graph(out, x, p, adapters.tensors() if adapters is not None else None)

    def check(self, hidden: torch.Tensor, position_ids: torch.Tensor,
              attention_mask: torch.Tensor | None, cache: SpanCache | None) -> None:
        """Refuse a step this span cannot take (BadRequest, MaxLengthExceeded), before it changes anything."""
        if hidden.dim() != 3 or hidden.shape[2] != self.hidden_size:
            raise BadRequest(f"hidden states must be [batch, tokens, {self.hidden_size}], "
                             f"got {list(hidden.shape)}")
        if tuple(position_ids.shape) != tuple(hidden.shape[:2]):
            raise BadRequest(f"position_ids must be {list(hidden.shape[:2])}, got {list(position_ids.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise BadRequest(f"attention_mask must be {list(hidden.shape[:2])}, "
                             f"got {list(attention_mask.shape)}")
        if cache is not None and hidden.shape[0] != cache.batch_size:
            raise BadRequest(f"batch {hidden.shape[0]} does not match the session's {cache.batch_size}")
        if cache is not None and cache.length + hidden.shape[1] > cache.max_length:
            raise MaxLengthExceeded(f"maximum length exceeded: {cache.length} + {hidden.shape[1]} > "
                                    f"{cache.max_length}", hint="open the session with a larger max_length")


def check_range(config: PretrainedConfig, start: int, end: int) -> None:
    """Refuse blocks outside the model."""
    n = config.num_hidden_layers
    if not 0 <= start < end <= n:
        raise SpanOutOfRange(f"blocks {start}:{end} are outside the model's 0:{n}")


def load_span(folder, config: PretrainedConfig, start: int, end: int, dtype: torch.dtype = torch.float32,
              hook: LayerHook | None = None, fetch: Fetch | None = None,
              device: torch.device | str = "cpu") -> Span:
    """Build blocks [start, end) on `device`, reading only their tensors from the checkpoint in `folder`
    (with `fetch`, downloading only the files that hold them). Each layer is read on the host, passed to
    `hook` there (bitsandbytes quantizes a host weight as it moves it to the device), then moved, so the
    device never holds more than the span."""
    check_range(config, start, end)
    family = compat.family_of(config)
    ckpt = Checkpoint.open(folder, fetch)
    layers = []
    for i in range(start, end):
        with torch.device("meta"):
            layer = compat.build_layer(family, config, i)
        state = family.block_state(read_block(ckpt, family.layer_prefixes, i, dtype))
        layer.load_state_dict(state, strict=True, assign=True)
        layer = layer.to(dtype)
        layers.append((hook(layer, i) if hook is not None else layer).to(device))
    return Span(config, start, end, layers, dtype)


def span_from_model(model: nn.Module, start: int, end: int) -> Span:
    """A span sharing the weights of an already loaded full model (tests, local reference runs)."""
    config = model.config
    check_range(config, start, end)
    base = getattr(model, "model", None) or getattr(model, "transformer")
    blocks = getattr(base, "layers", None) or getattr(base, "h")
    dtype = next(model.parameters()).dtype
    return Span(config, start, end, list(blocks[start:end]), dtype)


def block_params(config: PretrainedConfig) -> tuple[int, int]:
    """(parameters in linear layers, other parameters) of one block, counted on the meta device."""
    family = compat.family_of(config)
    with torch.device("meta"):
        layer = compat.build_layer(family, compat.ensure_attention(config), 0)
    linear = sum(p.numel() for m in layer.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    linear += sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in layer.modules() if is_fused_experts(m))
    return linear, sum(p.numel() for p in layer.parameters()) - linear
