"""Text generation over any chain of blocks that keeps its own caches.

`run_blocks(hidden, position_ids, attention_mask, position) -> hidden` is the only thing generation needs from
the blocks: local spans (`LocalSpans`) and remote inference sessions both provide it, so the local
reference run and the swarm share every line below. The loop itself (`Generator.steps`) does no I/O: it asks
for each pass (`BlockCall`) and is handed the result, so a thread can run the blocks by calling them
(`stream`) and an event loop by awaiting them (`astream`, one loop serving many sessions). Logit processing uses transformers' own processor
classes in the order `generate()` applies them, so greedy and seeded sampling match `generate()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterator, Protocol, Sequence
from typing import Generator as GenIterator

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import Rewind
from .head import ClientHead, prepend_prefix, token_positions
from .span import Span
from .speculative import Speculator, accept_draft

__all__ = ["RunBlocks", "SamplingConfig", "LocalSpans", "BlockCall", "CheckCall", "Generator"]


class RunBlocks(Protocol):
    """Run new tokens through every block. `position` is how many tokens the caches should already hold:
    a chain whose caches are ahead (a step whose answer was lost) rolls back to it."""

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, position: int) -> torch.Tensor: ...


@dataclass
class SamplingConfig:
    """How tokens are chosen, with transformers' generate() meaning for each option."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    pad_token_id: int | None = None
    seed: int | None = None  # a generator of the session's own (None: torch's global one, as generate() uses)

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
            cache.start_at(position)
            hidden = span(hidden, position_ids, cache, attention_mask)
        return hidden


@dataclass(frozen=True)
class BlockCall:
    """Generation asks for new positions to go through every block (`RunBlocks`' arguments)."""

    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position: int


@dataclass(frozen=True)
class CheckCall:
    """Generation asks for the blocks' outputs at cache positions [0, end) to be checked before it ends."""

    end: int


@dataclass
class Generator:
    """One generation session: the tokens fed so far and the caches behind `run_blocks`.

    Several `generate` calls continue the same session: the last sampled token of a call is fed at the
    start of the next one, so two calls equal one run over the concatenated text.
    """

    head: ClientHead
    run_blocks: RunBlocks | None  # for `stream`; `astream` is given its own
    tokenizer: object | None = None
    ids: torch.Tensor | None = None  # every token of the session, [B, L]
    mask: torch.Tensor | None = None  # [B, L]
    fed: int = 0  # how many of `ids` the caches hold
    prefix: torch.Tensor | None = None  # [P, H] trained virtual tokens, fed before the first token
    speculator: Speculator | None = None  # drafts checked several per pass (batch 1)
    check_all: Callable[[int], None] | None = None  # checks the blocks' outputs so far; may raise Rewind
    on_rewind: Callable[[int], None] | None = None  # told how many of this call's tokens stand after a Rewind

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               config: SamplingConfig | None = None) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens [B] as they are sampled, running the blocks with `run_blocks`."""
        steps = self.steps(input_ids, attention_mask, config)
        try:
            item = _advance(steps, None, None)
            while item is not None:
                reply, error = None, None
                try:
                    if isinstance(item, BlockCall):
                        reply = self.run_blocks(item.hidden, item.position_ids, item.attention_mask, item.position)
                    elif isinstance(item, CheckCall):
                        self.check_all(item.end)
                    else:
                        yield item
                except Exception as e:  # raised where the generation asked for it (a Rewind rewinds)
                    error = e
                item = _advance(steps, reply, error)
        finally:
            steps.close()

    async def astream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      config: SamplingConfig | None, run_blocks: Callable[..., Awaitable[torch.Tensor]],
                      check_all: Callable[[int], Awaitable[None]] | None = None) -> AsyncIterator[torch.Tensor]:
        """`stream` for an event loop: the blocks and the checks are awaited, so one loop serves many."""
        steps = self.steps(input_ids, attention_mask, config, checks=check_all is not None)
        try:
            item = _advance(steps, None, None)
            while item is not None:
                reply, error = None, None
                try:
                    if isinstance(item, BlockCall):
                        reply = await run_blocks(item.hidden, item.position_ids, item.attention_mask, item.position)
                    elif isinstance(item, CheckCall):
                        await check_all(item.end)
                    else:
                        yield item
                except Exception as e:
                    error = e
                item = _advance(steps, reply, error)
        finally:
            steps.close()

    @torch.no_grad()
    def steps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              config: SamplingConfig | None = None, checks: bool | None = None
              ) -> GenIterator[torch.Tensor | BlockCall | CheckCall, torch.Tensor | None, None]:
        """The generation without its I/O: yields a `BlockCall` (send back the blocks' output), a `CheckCall`
        (send None; throw a Rewind in if the check found a lie) or the next tokens [B]. Errors thrown in
        are raised where the call was asked for. `stream` and `astream` drive it."""
        config = config or SamplingConfig()
        checks = self.check_all is not None if checks is None else checks
        rng = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        self._append(input_ids, attention_mask)
        procs = config.processors(self.mask)
        batch = self.ids.shape[0]
        unfinished = torch.ones(batch, dtype=torch.bool)
        pad = config.pad_token_id if config.pad_token_id is not None else (
            config.eos_token_ids[0] if config.eos_token_ids else 0)
        eos = torch.tensor(list(config.eos_token_ids), dtype=torch.long)
        start_len = self.ids.shape[1]
        produced = 0
        try:
            while True:
                try:
                    while produced < config.max_new_tokens and unfinished.any():
                        tokens = yield from self._next_tokens(config, procs, config.max_new_tokens - produced, rng)
                        for token in tokens:
                            token = torch.where(unfinished, token, torch.full_like(token, pad))
                            self._append(token[:, None], None)
                            produced += 1
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
                    if checks:  # the answer as a whole is checked before it is final
                        yield CheckCall(self.fed + self._prefix_length if self.fed else 0)
                    return
                except Rewind as r:
                    produced = self._rewind(r.position, start_len)
                    unfinished = ~torch.isin(self.ids[:, start_len:], eos).any(dim=1) if len(eos) \
                        else torch.ones(batch, dtype=torch.bool)
        finally:  # a pass may have fed drafts that were accepted but not taken (a stop, or the caller left)
            self.fed = min(self.fed, self.length)

    @property
    def _prefix_length(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[0]

    def _rewind(self, position: int, start_len: int) -> int:
        """Drop the tokens sampled from outputs at cache position `position` or later (the blocks found
        them wrong) and feed again from there; the number of this call's tokens that are kept."""
        p = self._prefix_length
        keep = min(self.length, max(position - p + 1, start_len))
        self.ids, self.mask = self.ids[:, :keep], self.mask[:, :keep]
        self.fed = max(0, min(position - p, keep - 1))
        if self.on_rewind is not None:
            self.on_rewind(keep - start_len)
        return keep - start_len

    def _next_tokens(self, config: SamplingConfig, procs: LogitsProcessorList, limit: int,
                     rng: torch.Generator | None = None) -> GenIterator[BlockCall, torch.Tensor, list[torch.Tensor]]:
        """One pass through the blocks: its new tokens [B] in order (several when drafts are accepted)."""
        drafts: list[int] = []
        length, pending = self.length, self.length - self.fed
        t0 = time.perf_counter()
        if self.speculator is not None and self.ids.shape[0] == 1 and limit > 1:
            drafts = self.speculator.draft(self.ids[0].tolist(), limit - 1)
        logits = yield from self._feed(drafts)
        if self.speculator is not None and pending == 1:  # a prompt pass says nothing of a step's cost
            self.speculator.record_pass(1 + len(drafts), time.perf_counter() - t0)  # drafting included
        context, out = self.ids, []
        for i, draft in enumerate(drafts):
            kept, token = accept_draft(procs(context, logits[:, i].to(torch.float32)), draft, config.do_sample, rng)
            out.append(token)
            if not kept:
                break
            context = torch.cat([context, token[:, None]], dim=1)
        else:
            out.append(_choose(procs(context, logits[:, len(drafts)].to(torch.float32)), config.do_sample, rng))
        accepted = len(out) - 1
        self.fed = length + accepted  # the accepted drafts are in the caches; the next pass rolls back the rest
        if self.speculator is not None:
            self.speculator.record_outcome(len(drafts), accepted, len(out))
        return out

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 config: SamplingConfig | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Return the new tokens [B, n]; `on_token` is called with each step's tokens (after a `Rewind`,
        the tokens sampled again are passed again: `on_rewind` says how many stood)."""
        start = self.length + input_ids.shape[1]
        for token in self.stream(input_ids, attention_mask, config):
            if on_token is not None:
                on_token(token)
        return self.ids[:, start:].clone()

    def _append(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        mask = mask.to(torch.long) if mask is not None else torch.ones_like(ids, dtype=torch.long)
        if self.ids is None:
            self.ids, self.mask = ids.to(torch.long), mask
        else:
            if ids.shape[0] != self.ids.shape[0]:
                raise ValueError(f"batch {ids.shape[0]} does not match the session's {self.ids.shape[0]}")
            self.ids = torch.cat([self.ids, ids.to(torch.long)], dim=1)
            self.mask = torch.cat([self.mask, mask], dim=1)

    def _feed(self, drafts: Sequence[int] = ()) -> GenIterator[BlockCall, torch.Tensor, torch.Tensor]:
        """Run the tokens not yet in the caches, then `drafts`, through the blocks; return the logits of the
        last fed token of `ids` and of each draft, [B, 1 + len(drafts), V]."""
        if self.fed >= self.length:  # everything is cached (a stop on an accepted draft): feed the last again
            self.fed = self.length - 1
        ids, mask = self.ids, self.mask
        if drafts:
            extra = torch.tensor([list(drafts)] * ids.shape[0], dtype=torch.long)
            ids, mask = torch.cat([ids, extra], dim=1), torch.cat([mask, torch.ones_like(extra)], dim=1)
        p = 0 if self.prefix is None else self.prefix.shape[0]
        positions = token_positions(mask, p)[:, self.fed:]
        new_mask = mask[:, self.fed:]
        hidden = self.head.embed(ids[:, self.fed:])
        if p and self.fed == 0:  # the virtual tokens go first
            hidden, new_mask, positions = prepend_prefix(hidden, new_mask, positions, self.prefix)
        hidden = yield BlockCall(hidden, positions, new_mask, self.fed + (p if self.fed else 0))
        self.fed = self.length
        return self.head.logits(hidden[:, -(1 + len(drafts)):, :])

    @property
    def length(self) -> int:
        return 0 if self.ids is None else int(self.ids.shape[1])


def _advance(steps: GenIterator, reply: torch.Tensor | None, error: Exception | None
             ) -> torch.Tensor | BlockCall | CheckCall | None:
    """Resume `steps` with the last request's answer (or raise its error there); its next item, or None
    once the generation has ended."""
    try:
        return steps.throw(error) if error is not None else steps.send(reply)
    except StopIteration:
        return None


def _choose(scores: torch.Tensor, do_sample: bool, rng: torch.Generator | None = None) -> torch.Tensor:
    """The next token [B] from processed scores [B, V]."""
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=rng).squeeze(1)
    return scores.argmax(dim=-1)
