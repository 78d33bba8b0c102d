"""The one module that knows transformers' decoder-layer API.

Layer internals change between transformers releases (the cache keyword, whether a layer returns a
tensor or a tuple, who computes rotary embeddings). Everything else in mesh calls the functions here,
so a new release means changing this file only. What differs between families is data, in
`families.py`; this module interprets it. Tested range: transformers >=5.20,<5.40 (pinned in
pyproject.toml; 5.40 removes the `past_key_values` alias this code no longer uses).
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .errors import CacheTrimmed, UnsupportedArchitecture
from .families import FamilySpec, HeadLayout, spec_for, supported_types, wrapping

__all__ = ["Family", "family_of", "layer_type", "build_layer", "WindowLayer", "new_kv_cache", "kv_length",
           "kv_crop", "lm_logits_with_cache", "LayerRunner", "load_config", "ensure_attention"]

TESTED_TRANSFORMERS = (">=5.20", "<5.40")


@dataclass(frozen=True)
class Family:
    """A registry entry resolved to transformers' classes: how to build and call one family's layers."""

    spec: FamilySpec
    layer_class: type[nn.Module]
    rotary_class: type[nn.Module] | None
    positions: str  # the entry's position rule for this config

    @property
    def layer_prefixes(self) -> tuple[str, ...]:
        return self.spec.layer_prefixes

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        return self.spec.head_prefixes

    @property
    def head(self) -> HeadLayout:
        return self.spec.head

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return self.spec.lora_targets

    def block_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A block's checkpoint tensors (names relative to the block) as its layer class names them."""
        return self.spec.convert_block(state) if self.spec.convert_block is not None else state


def family_of(config: PretrainedConfig) -> Family:
    """Return the layer family for a config, or raise UnsupportedArchitecture."""
    model_type = getattr(config, "model_type", None)
    spec = spec_for(model_type)
    if spec is None and wrapping(model_type) is not None:
        raise UnsupportedArchitecture(f"{model_type!r} is a multimodal config; mesh runs its text part",
                                      hint="read the config with compat.load_config, which keeps the text part")
    if spec is None:
        raise UnsupportedArchitecture(f"model type {model_type!r} is not supported",
                                      hint=f"supported: {', '.join(supported_types())}")
    module = importlib.import_module(spec.module)
    positions = spec.positions(config) if callable(spec.positions) else spec.positions
    rotary = getattr(module, spec.rotary_class) if spec.rotary_class is not None and positions.startswith("rotary") \
        else None
    return Family(spec, getattr(module, spec.layer_class), rotary, positions)


def build_layer(family: Family, config: PretrainedConfig, layer_idx: int) -> nn.Module:
    """One decoder layer with its global index (caches are keyed by it)."""
    return family.layer_class(config, layer_idx=layer_idx)


ROLLBACK_SLACK = 256  # tokens a windowed layer keeps beyond its window: rejected drafts, re-sent steps


class WindowLayer(DynamicLayer):
    """The cache of a sliding-window layer: only its last `window - 1 + slack` tokens are kept, since no
    later token attends further back; the slack lets a session roll back rejected drafts or a re-sent
    step. A deeper rollback raises CacheTrimmed (the caller replays instead). Each update returns what
    was kept plus the new tokens, and `get_mask_sizes` says where those start, for the window's mask."""

    is_sliding = True

    def __init__(self, window: int, slack: int) -> None:
        super().__init__()
        self.keep = window - 1 + slack
        self.cumulative_length = 0

    @property
    def kept(self) -> int:
        return int(self.keys.shape[-2]) if self.is_initialized and self.keys.dim() == 4 else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        self.keys, self.values = keys[:, :, -self.keep:], values[:, :, -self.keep:]
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kept + query_length, self.cumulative_length - self.kept

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def check_rollback(self, drop: int) -> None:
        """CacheTrimmed unless the last `drop` tokens can be dropped (an unused slot has nothing to drop)."""
        if self.cumulative_length and drop > self.kept:
            raise CacheTrimmed(f"cannot roll back {drop} tokens: a windowed layer keeps its last {self.kept}",
                               hint="replay the tokens")

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (a negative count, as transformers' caches take it)."""
        drop = -tokens_to_remove if tokens_to_remove < 0 else self.cumulative_length - tokens_to_remove
        self.check_rollback(drop)
        if drop > 0 and self.cumulative_length:
            self.keys, self.values = self.keys[:, :, :-drop], self.values[:, :, :-drop]
            self.cumulative_length -= drop

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0


def new_kv_cache(config: PretrainedConfig, end: int | None = None) -> DynamicCache:
    """An empty KV cache for layers [.., end) (keyed by their global indices), their sliding-window layers
    trimmed to the window (WindowLayer). Without `end`, every layer keeps every token (a whole model's
    cache, created lazily)."""
    cache = DynamicCache()
    window = getattr(config, "sliding_window", None)
    if end is not None:
        # empty slots before a span's first layer cost nothing
        cache.layers = [WindowLayer(window, ROLLBACK_SLACK) if window and layer_type(config, i) == SLIDING
                        else DynamicLayer() for i in range(end)]
    return cache


def kv_length(cache: DynamicCache, first_layer: int) -> int:
    """Tokens held for the span starting at `first_layer` (get_seq_length defaults to layer 0)."""
    return cache.get_seq_length(first_layer)


def kv_crop(cache: DynamicCache, tokens_to_remove: int) -> None:
    """Drop the last `tokens_to_remove` tokens of every layer's cache (rollbacks), or raise CacheTrimmed,
    before changing anything, when a windowed layer no longer holds that many."""
    if tokens_to_remove <= 0:
        return
    for layer in cache.layers:
        if isinstance(layer, WindowLayer):
            layer.check_rollback(tokens_to_remove)
    cache.crop(-tokens_to_remove)  # only negative counts are accepted in 5.x


def lm_logits_with_cache(model: nn.Module, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """A whole causal LM's logits for new tokens, extending `cache` (a local draft model's pass)."""
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"  # renamed within the 5.x series
    return model(input_ids=input_ids, use_cache=True, **{key: cache}).logits


FULL, SLIDING = "full_attention", "sliding_attention"
MASKS = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}


def _bias_in_mask(mask: torch.Tensor, alibi: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """An additive mask carrying the ALiBi bias (scaled by 1/sqrt(head_dim)) where tokens may attend."""
    low = torch.finfo(alibi.dtype).min
    if mask.dtype == torch.bool:
        mask = torch.where(mask, torch.zeros((), dtype=alibi.dtype, device=mask.device), low)
    bias = alibi.reshape(-1, heads, *alibi.shape[1:]) / math.sqrt(head_dim)
    return torch.masked_fill(bias, mask < -1, low)


def layer_type(config: PretrainedConfig, layer_idx: int) -> str:
    """Whether block `layer_idx` attends to everything before it or to a sliding window, as the family's
    own model decides: by `config.layer_types` when the config lists them, else by `sliding_window`."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[layer_idx]
    return SLIDING if getattr(config, "sliding_window", None) is not None else FULL


class LayerRunner:
    """Runs a list of layers of one family over hidden states, with an optional KV cache.

    `attention_mask` is the full 2-D mask over (cached + new) tokens, 1 = attend, or None for all ones.
    The masks are built once per call, before any layer updates the cache, each from the cache of the
    span's first layer of its kind (full or sliding window: a windowed layer keeps fewer tokens), so a span
    cache that does not start at layer 0 reads its own sizes. Each layer then gets the mask and the
    position tables of its kind.
    """

    def __init__(self, family: Family, config: PretrainedConfig, first_layer: int,
                 end_layer: int | None = None) -> None:
        self.family = family
        self.config = config
        self.first_layer = first_layer
        self.rotary = family.rotary_class(config) if family.rotary_class is not None else None
        end = end_layer if end_layer is not None else getattr(config, "num_hidden_layers", 0) or first_layer + 1
        # each kind's mask is sized by the cache of the span's first layer of that kind (windowed layers
        # keep fewer tokens)
        self.first_of_kind: dict[str, int] = {}
        for i in range(first_layer, end):
            self.first_of_kind.setdefault(layer_type(config, i), i)
        self.types = sorted(self.first_of_kind)

    def prepare(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
        attention_mask: torch.Tensor | None,
    ) -> dict[str, Any]:
        """Per-call arguments shared by every layer of the span: masks and positions by layer kind."""
        positions = self.family.positions
        masks = {
            kind: MASKS[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                layer_idx=self.first_of_kind[kind],
                allow_is_causal_skip=positions != "alibi_in_mask",  # the bias needs a materialized mask
            )
            for kind in self.types
        }
        if positions in ("alibi", "alibi_in_mask"):
            past = kv_length(cache, self.first_layer) if cache is not None else 0
            if attention_mask is None:
                attention_mask = torch.ones(hidden.shape[0], past + hidden.shape[1], dtype=torch.long,
                                            device=hidden.device)
            module = importlib.import_module(self.family.spec.module)
            heads = self.config.num_attention_heads
            alibi = module.build_alibi_tensor(attention_mask, heads, dtype=hidden.dtype)
            if positions == "alibi":
                return {"masks": masks, "extra": {"alibi": alibi}}
            return {"masks": {kind: _bias_in_mask(mask, alibi, heads, self.config.hidden_size // heads)
                              for kind, mask in masks.items()}}
        self.rotary.to(hidden.device)
        if positions == "rotary_by_layer_type":
            tables = {kind: self.rotary(hidden, position_ids, kind) for kind in self.types}
        else:
            table = self.rotary(hidden, position_ids)
            tables = {kind: table for kind in self.types}
        return {"masks": masks, "tables": tables}

    def call(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
        prepared: dict[str, Any],
        layer_idx: int | None = None,
    ) -> torch.Tensor:
        """One layer over `hidden`; `layer_idx` is its global index (the span's first when omitted)."""
        kind = layer_type(self.config, self.first_layer if layer_idx is None else layer_idx)
        kwargs: dict[str, Any] = {
            "attention_mask": prepared["masks"][kind],
            self.family.spec.cache_keyword: cache,
            "use_cache": cache is not None,
        }
        if "tables" in prepared:
            kwargs["position_ids"] = position_ids
            kwargs["position_embeddings"] = prepared["tables"][kind]
        kwargs.update(prepared.get("extra", {}))
        out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def load_config(path: str) -> PretrainedConfig:
    """A model folder's config, with the attention implementation mesh runs. A multimodal model whose text
    part is a supported family gives that part's config: mesh serves its language model, text in, text out."""
    config = AutoConfig.from_pretrained(path)
    if spec_for(config.model_type) is None and wrapping(config.model_type) is not None:
        config = config.get_text_config()
    return ensure_attention(config)


def ensure_attention(config: PretrainedConfig) -> PretrainedConfig:
    """Standalone layers read the attention kernel from the config; pick the one models default to."""
    if getattr(config, "_attn_implementation", None) is None:
        spec = spec_for(getattr(config, "model_type", None))
        config._attn_implementation = spec.attention if spec is not None else "sdpa"
    return config
