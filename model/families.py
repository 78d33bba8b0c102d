"""The model families mesh can split into spans: one small data entry per model type.

An entry says where a family's classes are, how its checkpoints name blocks and head tensors, how its
layers learn positions (rotary tables built outside the layer, one per layer kind, or ALiBi), which
keyword carries the cache, what the client head does around the blocks (embedding scale, final logit
soft-capping) and which projections LoRA targets by default. `compat` turns an entry into calls of
transformers' layer classes; nothing else in mesh branches on a family's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

__all__ = ["HeadLayout", "FamilySpec", "FAMILIES", "spec_for", "wrapping", "supported_types"]

# How layers learn positions: rotary tables built outside them (one, or one per layer kind), ALiBi passed
# to the layer (BLOOM), or ALiBi folded into the attention mask (Falcon-RW).
Positions = Literal["rotary", "rotary_by_layer_type", "alibi", "alibi_in_mask"]
BlockConverter = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class HeadLayout:
    """Where the client-side parts sit in the causal-LM class (attribute paths)."""

    base: str  # the base model inside the causal-LM class
    embed: str  # token embeddings, inside `base`
    final_norm: str  # inside `base`
    embed_norm: str | None = None  # a norm right after the embeddings (BLOOM)
    scale_embeddings: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    softcap_logits: bool = False  # tanh soft-capping of the logits at config.final_logit_softcapping, when set (Gemma)


@dataclass(frozen=True)
class FamilySpec:
    """Everything mesh needs to know about one model type."""

    model_type: str
    module: str  # transformers module holding the classes
    layer_class: str
    rotary_class: str | None
    positions: Positions | Callable[[object], Positions]  # a function of the config where that decides
    cache_keyword: str  # the layer's keyword for the KV cache
    layer_prefixes: tuple[str, ...]  # checkpoint name prefixes of block i, formatted with {i}
    head_prefixes: tuple[str, ...]  # checkpoint prefixes of the base model (embeddings, final norm)
    head: HeadLayout
    lora_targets: tuple[str, ...]
    attention: str = "sdpa"  # the kernel the family's model class defaults to
    convert_block: BlockConverter | None = None  # checkpoint layout -> the layer class's state dict
    wrappers: tuple[str, ...] = ()  # multimodal model types whose text part is this family (run text-only)


def _merge_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral checkpoints store each expert's w1/w2/w3; the layer holds them stacked, gate and up fused."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if name.startswith("block_sparse_moe.experts."):
            index, weight = name[len("block_sparse_moe.experts."):].split(".", 1)
            experts.setdefault(int(index), {})[weight.split(".")[0]] = t
        elif name.startswith("block_sparse_moe."):
            out["mlp." + name[len("block_sparse_moe."):]] = t
        else:
            out[name] = t
    if experts:
        ordered = [experts[e] for e in sorted(experts)]
        out["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e["w1"], e["w3"]], dim=0) for e in ordered])
        out["mlp.experts.down_proj"] = torch.stack([e["w2"] for e in ordered])
    return out


DECODER = HeadLayout(base="model", embed="embed_tokens", final_norm="norm")
GEMMA = HeadLayout(base="model", embed="embed_tokens", final_norm="norm", scale_embeddings=True,
                   softcap_logits=True)
TRANSFORMER = HeadLayout(base="transformer", embed="word_embeddings", final_norm="ln_f")
DECODER_PREFIXES = dict(layer_prefixes=("model.layers.{i}.", "layers.{i}."), head_prefixes=("model.", ""))
TRANSFORMER_PREFIXES = dict(layer_prefixes=("transformer.h.{i}.", "h.{i}."), head_prefixes=("transformer.", ""))
QV = ("q_proj", "v_proj")


def _rotary(model_type: str, stem: str, head: HeadLayout = DECODER, targets: tuple[str, ...] = QV,
            module: str | None = None, **extra) -> FamilySpec:
    """A decoder whose layers take rotary tables computed outside them, and the cache as `cache`."""
    module = module or model_type
    return FamilySpec(model_type=model_type, module=f"transformers.models.{module}.modeling_{module}",
                      layer_class=f"{stem}DecoderLayer", rotary_class=f"{stem}RotaryEmbedding",
                      cache_keyword="cache", head=head, lora_targets=targets,
                      **{"positions": "rotary", **DECODER_PREFIXES, **extra})


def _falcon_positions(config: object) -> Positions:
    return "alibi_in_mask" if getattr(config, "alibi", False) else "rotary"


FAMILIES: tuple[FamilySpec, ...] = (
    _rotary("llama", "Llama"),
    _rotary("mistral", "Mistral"),
    _rotary("qwen2", "Qwen2"),
    FamilySpec(model_type="bloom", module="transformers.models.bloom.modeling_bloom", layer_class="BloomBlock",
               rotary_class=None, positions="alibi", cache_keyword="layer_past",
               head=HeadLayout(base="transformer", embed="word_embeddings", final_norm="ln_f",
                               embed_norm="word_embeddings_layernorm"),
               lora_targets=("query_key_value",), attention="eager", **TRANSFORMER_PREFIXES),
    _rotary("qwen3", "Qwen3"),
    _rotary("mixtral", "Mixtral", convert_block=_merge_experts),
    _rotary("phi3", "Phi3", targets=("qkv_proj",)),
    _rotary("gemma2", "Gemma2", head=GEMMA, attention="eager"),  # sdpa cannot soft-cap attention logits
    _rotary("gemma3_text", "Gemma3", head=GEMMA, module="gemma3", positions="rotary_by_layer_type",
            wrappers=("gemma3",),
            layer_prefixes=("model.layers.{i}.", "layers.{i}.", "language_model.model.layers.{i}.",
                            "model.language_model.layers.{i}."),
            head_prefixes=("model.", "", "language_model.model.", "model.language_model.")),
    FamilySpec(model_type="falcon", module="transformers.models.falcon.modeling_falcon",
               layer_class="FalconDecoderLayer", rotary_class="FalconRotaryEmbedding", positions=_falcon_positions,
               cache_keyword="layer_past", head=TRANSFORMER, lora_targets=("query_key_value",),
               **TRANSFORMER_PREFIXES),
)


def spec_for(model_type: str | None) -> FamilySpec | None:
    """The entry covering `model_type`, or None."""
    return next((f for f in FAMILIES if f.model_type == model_type), None)


def wrapping(model_type: str | None) -> FamilySpec | None:
    """The entry whose family is the text part of the multimodal `model_type`, or None."""
    return next((f for f in FAMILIES if model_type in f.wrappers), None)


def supported_types() -> list[str]:
    return sorted(f.model_type for f in FAMILIES)
