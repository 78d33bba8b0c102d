"""The one module that knows transformers' decoder-layer API.

Layer internals change between transformers releases (the cache keyword, whether a layer returns a
tensor or a tuple, who computes rotary embeddings). Everything else in mesh calls the functions here,
so a new release means changing this file only. Tested range: transformers >=5.20,<5.40 (pinned in
pyproject.toml; 5.40 removes the `past_key_values` alias this code no longer uses).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask

from .errors import UnsupportedArchitecture

__all__ = ["Family", "family_of", "build_layer", "new_kv_cache", "kv_length", "kv_crop",
           "lm_logits_with_cache", "LayerRunner", "load_config", "ensure_attention"]

TESTED_TRANSFORMERS = (">=5.20", "<5.40")

# model_type -> family. Llama-like models share one path: RoPE computed outside the layer.
LLAMA_LIKE = {"llama", "mistral", "qwen2"}
ALIBI = {"bloom"}


@dataclass(frozen=True)
class Family:
    """How to build and call the decoder layers of one architecture."""

    name: str  # "llama" or "bloom"
    model_type: str
    layer_class: type[nn.Module]
    layer_prefixes: tuple[str, ...]  # checkpoint name prefixes of block i, formatted with {i}
    head_prefixes: tuple[str, ...]  # checkpoint prefixes of the base model (embeddings, final norm)
    rotary_class: type[nn.Module] | None


def family_of(config: PretrainedConfig) -> Family:
    """Return the layer family for a config, or raise UnsupportedArchitecture."""
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_LIKE:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        prefix = _class_prefix(module, "DecoderLayer")
        return Family(
            name="llama",
            model_type=model_type,
            layer_class=getattr(module, f"{prefix}DecoderLayer"),
            layer_prefixes=("model.layers.{i}.", "layers.{i}."),
            head_prefixes=("model.", ""),
            rotary_class=getattr(module, f"{prefix}RotaryEmbedding"),
        )
    if model_type in ALIBI:
        module = importlib.import_module("transformers.models.bloom.modeling_bloom")
        return Family(
            name="bloom",
            model_type=model_type,
            layer_class=module.BloomBlock,
            layer_prefixes=("transformer.h.{i}.", "h.{i}."),
            head_prefixes=("transformer.", ""),
            rotary_class=None,
        )
    supported = ", ".join(sorted(LLAMA_LIKE | ALIBI))
    raise UnsupportedArchitecture(
        f"model type {model_type!r} is not supported", hint=f"supported: {supported}"
    )


def _class_prefix(module: Any, suffix: str) -> str:
    for name in dir(module):
        if name.endswith(suffix) and not name.startswith("_"):
            return name[: -len(suffix)]
    raise UnsupportedArchitecture(f"{module.__name__} has no *{suffix} class")


def build_layer(family: Family, config: PretrainedConfig, layer_idx: int) -> nn.Module:
    """One decoder layer with its global index (caches are keyed by it)."""
    return family.layer_class(config, layer_idx=layer_idx)


def new_kv_cache(config: PretrainedConfig) -> DynamicCache:
    # Slots are created lazily up to the highest layer index used; empty slots cost nothing.
    """An empty KV cache for the layers of a span (keyed by their global indices)."""
    return DynamicCache()


def kv_length(cache: DynamicCache, first_layer: int) -> int:
    """Tokens held for the span starting at `first_layer` (get_seq_length defaults to layer 0)."""
    return cache.get_seq_length(first_layer)


def kv_crop(cache: DynamicCache, tokens_to_remove: int) -> None:
    """Drop the last `tokens_to_remove` tokens of every layer's cache (rollbacks)."""
    if tokens_to_remove > 0:
        cache.crop(-tokens_to_remove)  # only negative counts are accepted in 5.x


def lm_logits_with_cache(model: nn.Module, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """A whole causal LM's logits for new tokens, extending `cache` (a local draft model's pass)."""
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"  # renamed within the 5.x series
    return model(input_ids=input_ids, use_cache=True, **{key: cache}).logits


class LayerRunner:
    """Runs a list of layers of one family over hidden states, with an optional KV cache.

    `attention_mask` is the full 2-D mask over (cached + new) tokens, 1 = attend, or None for all ones.
    The mask is built once per call, before any layer updates the cache, and with the span's first layer
    index so a span cache that does not start at layer 0 reads its own length.
    """

    def __init__(self, family: Family, config: PretrainedConfig, first_layer: int) -> None:
        self.family = family
        self.config = config
        self.first_layer = first_layer
        self.rotary = family.rotary_class(config) if family.rotary_class is not None else None

    def prepare(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
        attention_mask: torch.Tensor | None,
    ) -> dict[str, Any]:
        """Per-call arguments shared by every layer of the span."""
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=self.first_layer,
        )
        if self.family.name == "llama":
            self.rotary.to(hidden.device)
            return {"mask": mask, "position_embeddings": self.rotary(hidden, position_ids)}
        past = kv_length(cache, self.first_layer) if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[0], past + hidden.shape[1], dtype=torch.long,
                                        device=hidden.device)
        bloom = sys.modules[self.family.layer_class.__module__]
        alibi = bloom.build_alibi_tensor(attention_mask, self.config.n_head, dtype=hidden.dtype)
        return {"mask": mask, "alibi": alibi}

    def call(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
        prepared: dict[str, Any],
    ) -> torch.Tensor:
        if self.family.name == "llama":
            out = layer(
                hidden,
                attention_mask=prepared["mask"],
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=prepared["position_embeddings"],
            )
        else:
            out = layer(
                hidden,
                alibi=prepared["alibi"],
                attention_mask=prepared["mask"],
                layer_past=cache,
                use_cache=cache is not None,
            )
        return out[0] if isinstance(out, tuple) else out


def load_config(path: str) -> PretrainedConfig:
    """A model folder's config, with the attention implementation mesh runs."""
    return ensure_attention(AutoConfig.from_pretrained(path))


def ensure_attention(config: PretrainedConfig) -> PretrainedConfig:
    """Standalone layers read the attention kernel from the config; pick the one models default to."""
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = "eager" if config.model_type == "bloom" else "sdpa"
    return config
