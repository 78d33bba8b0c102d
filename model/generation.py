"""Text generation over any chain of blocks that keeps its own caches.

`run_blocks(hidden, position_ids, attention_mask, position) -> hidden` is the only thing generation needs from
the blocks: local spans (`LocalSpans`) and remote inference sessions both provide it, so the local
reference run and the swarm share every line below. Logit processing uses transformers' own processor
classes in the order `generate()` applies them, so greedy and seeded sampling match `generate()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mesh.model.head import ClientHead
from mesh.model.span import Span


class RunBlocks(Protocol):
    """Run new tokens through every block. `position` is how many tokens the caches should already hold:
    a chain whose caches are ahead (a step whose answer was lost) rolls back to it."""

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, position: int) -> torch.Tensor: ...


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    pad_token_id: int | None = None

    def processors(self, mask: torch.Tensor | None = None) -> LogitsProcessorList:
        """`mask` is the session's attention mask: left padding is not penalised, as in generate()."""
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            padding = (mask != 0).int().argmax(dim=1) if mask is not None else None
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty,
                                                          prompt_ignore_length=padding))
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


class LocalSpans:
    """`run_blocks` over spans in this process, each with its own cache (the local reference run)."""

    def __init__(self, spans: list[Span], batch_size: int, max_length: int) -> None:
        self.spans = spans
        self.caches = [s.new_cache(batch_size, max_length) for s in spans]

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, position: int) -> torch.Tensor:
        for span, cache in zip(self.spans, self.caches):
            if cache.length > position:
                cache.rollback(position)
            hidden = span(hidden, position_ids, cache, attention_mask)
        return hidden


@dataclass
class Generator:
    """One generation session: the tokens fed so far and the caches behind `run_blocks`.

    Several `generate` calls continue the same session: the last sampled token of a call is fed at the
    start of the next one, so two calls equal one run over the concatenated text.
    """

    head: ClientHead
    run_blocks: RunBlocks
    tokenizer: object | None = None
    ids: torch.Tensor | None = None  # every token of the session, [B, L]
    mask: torch.Tensor | None = None  # [B, L]
    fed: int = 0  # how many of `ids` the caches hold
    prefix: torch.Tensor | None = None  # [P, H] trained virtual tokens, fed before the first token
    finished: torch.Tensor | None = field(default=None, repr=False)

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               config: SamplingConfig | None = None) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens [B] as they are sampled."""
        config = config or SamplingConfig()
        self._append(input_ids, attention_mask)
        procs = config.processors(self.mask)
        batch = self.ids.shape[0]
        unfinished = torch.ones(batch, dtype=torch.bool)
        pad = config.pad_token_id if config.pad_token_id is not None else (
            config.eos_token_ids[0] if config.eos_token_ids else 0)
        eos = torch.tensor(list(config.eos_token_ids), dtype=torch.long)
        start_len = self.ids.shape[1]
        for _ in range(config.max_new_tokens):
            logits = self._feed()[:, -1, :].to(torch.float32)
            scores = procs(self.ids, logits)
            if config.do_sample:
                probs = torch.softmax(scores, dim=-1)
                token = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                token = scores.argmax(dim=-1)
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            self._append(token[:, None], None)
            yield token
            if len(eos):
                unfinished &= ~torch.isin(token, eos)
            if config.stop_strings and self.tokenizer is not None:
                for b in range(batch):
                    text = self.tokenizer.decode(self.ids[b, start_len:])
                    if any(s in text for s in config.stop_strings):
                        unfinished[b] = False
            if not unfinished.any():
                break

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 config: SamplingConfig | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Return the new tokens [B, n]; `on_token` is called with each step's tokens."""
        out = []
        for token in self.stream(input_ids, attention_mask, config):
            out.append(token)
            if on_token is not None:
                on_token(token)
        return torch.stack(out, dim=1) if out else torch.empty(input_ids.shape[0], 0, dtype=torch.long)

    def _append(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        mask = mask.to(torch.long) if mask is not None else torch.ones_like(ids, dtype=torch.long)
        if self.ids is None:
            self.ids, self.mask = ids.to(torch.long), mask
        else:
            if ids.shape[0] != self.ids.shape[0]:
                raise ValueError(f"batch {ids.shape[0]} does not match the session's {self.ids.shape[0]}")
            self.ids = torch.cat([self.ids, ids.to(torch.long)], dim=1)
            self.mask = torch.cat([self.mask, mask], dim=1)

    def _feed(self) -> torch.Tensor:
        """Run the tokens not yet in the caches through the blocks; return their logits."""
        new_ids = self.ids[:, self.fed:]
        p = 0 if self.prefix is None else self.prefix.shape[0]
        positions = self.mask.cumsum(-1) - 1 + p
        positions = positions.masked_fill(self.mask == 0, 1)[:, self.fed:]
        new_mask = self.mask[:, self.fed:]
        hidden = self.head.embed(new_ids)
        if p and self.fed == 0:  # the virtual tokens go first, at positions 0..P-1, always attended
            batch = hidden.shape[0]
            hidden = torch.cat([self.prefix.to(hidden.dtype)[None].expand(batch, -1, -1), hidden], dim=1)
            positions = torch.cat([torch.arange(p)[None].expand(batch, -1), positions], dim=1)
            new_mask = torch.cat([torch.ones(batch, p, dtype=new_mask.dtype), new_mask], dim=1)
        hidden = self.run_blocks(hidden, positions, new_mask, self.fed + (p if self.fed else 0))
        self.fed = self.ids.shape[1]
        return self.head.logits(hidden[:, -1:, :])

    @property
    def length(self) -> int:
        return 0 if self.ids is None else int(self.ids.shape[1])
