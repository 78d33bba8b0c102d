"""One forward pass of a span for the steps of several sessions at once, each with its own cache.

Decode steps are batch-1 matrix products that leave most of a device idle; stacking the steps of B
sessions makes them B-row products for nearly the cost of one. The sessions' caches stay separate (a
session joins or leaves between steps, rolls back on its own, is replayed on its own): for each layer,
`RowsLayer` appends each session's new keys and values to that session's own cache, then hands the layer
the sessions' caches left-padded to the longest, as one batch. The 2-D masks are left-padded the same way,
so a row attends to its own tokens only; positions come with each step. One padded copy of the caches per
layer per pass is the price (the attention reads them all anyway).

Spans with sliding-window layers keep trimmed caches of different offsets per session and run solo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import compat
from .lora import LoraWeights
from .span import Span, SpanCache

__all__ = ["Row", "batchable", "run_rows"]


@dataclass
class Row:
    """One session's step: its cache and its new tokens' hidden states, positions and mask."""

    cache: SpanCache
    hidden: torch.Tensor  # [b, T, H]
    position_ids: torch.Tensor  # [b, T]
    attention_mask: torch.Tensor | None = None  # [b, T], None: all ones


class RowsLayer(DynamicLayer):
    """A layer of the batch's cache: updates go to each session's own layer; the layer sees them padded."""

    def __init__(self, parts: list[DynamicLayer], rows: list[int]) -> None:
        super().__init__()
        self.parts, self.rows = parts, rows  # each session's layer, and how many batch rows it has
        self.length = max(p.get_seq_length() for p in parts)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values, at = [], [], 0
        for part, n in zip(self.parts, self.rows):
            k, v = part.update(key_states[at:at + n], value_states[at:at + n])
            pad = self.length + key_states.shape[-2] - k.shape[-2]
            keys.append(F.pad(k, (0, 0, pad, 0)))
            values.append(F.pad(v, (0, 0, pad, 0)))
            at += n
        self.is_initialized = True
        return torch.cat(keys), torch.cat(values)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


def batchable(span: Span, rows: list[Row]) -> bool:
    """Whether these steps can share one pass: the same number of new tokens, no windowed cache."""
    if not rows or len({r.hidden.shape[1] for r in rows}) != 1:
        return False
    return not any(isinstance(layer, compat.WindowLayer) for r in rows for layer in r.cache.kv.layers)


def run_rows(span: Span, rows: list[Row], lora: LoraWeights | None = None) -> list[torch.Tensor]:
    """Each row's output of one pass of `span` over all of them (see `batchable`); every row's cache grows
    by its new tokens, as a solo `span(...)` call would grow it."""
    if len(rows) == 1:  # nothing to pad
        r = rows[0]
        return [span(r.hidden, r.position_ids, r.cache, r.attention_mask, lora=lora)]
    sizes = [r.hidden.shape[0] for r in rows]
    new = rows[0].hidden.shape[1]
    length = max(r.cache.length for r in rows)
    history = torch.cat([F.pad(r.cache.mask, (length - r.cache.length, 0)) for r in rows])
    kv = DynamicCache()
    kv.layers = [RowsLayer([r.cache.kv.layers[i] for r in rows], sizes) if i >= span.start else DynamicLayer()
                 for i in range(span.end)]
    together = SpanCache(sum(sizes), length + new, span.start, kv, history)
    masks = [r.attention_mask if r.attention_mask is not None else torch.ones(r.hidden.shape[:2], dtype=torch.long)
             for r in rows]
    out = span(torch.cat([r.hidden for r in rows]), torch.cat([r.position_ids for r in rows]), together,
               torch.cat(masks).to(history.device), lora=lora)
    for r, m in zip(rows, masks):
        r.cache.mask = torch.cat([r.cache.mask, m.to(r.cache.mask.device, torch.long)], dim=1)
    return list(out.split(sizes))
