"""The local reference run: a whole model as a chain of spans in one process.

The distributed path is measured against this: same head, same spans, same generation loop, only
the transport differs.
"""

from __future__ import annotations

import torch

from .head import ClientHead, load_head
from .sources import ModelSource
from .span import Span, load_span

__all__ = ["split_evenly", "load_local"]


def split_evenly(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous ranges covering [0, num_blocks) whose sizes differ by at most one."""
    parts = max(1, min(parts, num_blocks))
    base, extra = divmod(num_blocks, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def load_local(source: ModelSource, dtype: torch.dtype = torch.float32, num_spans: int = 3,
               device: torch.device | str = "cpu") -> tuple[ClientHead, list[Span]]:
    """The head and every block on `device` in this process, in `num_spans` spans (the reference run)."""
    head = load_head(source, dtype, device)
    spans = [load_span(source.path, source.config, a, b, dtype, fetch=source.fetch, device=device)
             for a, b in split_evenly(source.num_blocks, num_spans)]
    return head, spans
