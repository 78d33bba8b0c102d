"""Speculative decoding: draft several tokens here, check them all in one pass of the chain.

Over the internet a pass through the chain costs one trip through every server however few tokens it
carries, so a pass that checks k drafted tokens and keeps the longest correct prefix, plus the chain's
own next token, saves a whole trip per accepted draft. Drafts are deterministic, which keeps acceptance
exact and simple:
- greedy: a draft is kept while it equals the argmax, so the output equals plain greedy token for token;
- sampling: draft d is kept with probability p(d), else the token is drawn from p with d removed, so each
  token is distributed exactly as p (speculative sampling with a one-hot proposal).
Rejected drafts stay in the servers' caches until the next step, whose `position` rolls them back in the
same message: rejection costs no extra round trip.

Drafters: `PromptLookup` (the tokens that followed the latest earlier occurrence of the last n-gram; no
model needed) and `DraftModel` (a small local model of the same tokenizer, greedy). `Speculator` owns a
session's drafter, picks k per pass (fixed, or `auto`: the k with the most expected tokens per second
given the recent acceptance rate and the measured time of a pass), and keeps the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from . import compat
from .errors import BadRequest

__all__ = ["Drafter", "PromptLookup", "DraftModel", "Speculator", "parse_speculate", "accept_draft", "load_draft",
           "new_speculator", "MAX_DRAFT"]

MAX_DRAFT = 8  # drafts per pass at most (auto never goes past it)
DECAY = 0.9  # weight of the past in the running acceptance and timing estimates
EXPLORE_EVERY = 8  # when auto finds speculation not worth it, still try k=1 this often to keep measuring


class Drafter(Protocol):
    """Proposes up to k tokens that may follow `ids` (every token of the session so far)."""

    def propose(self, ids: list[int], k: int) -> list[int]: ...


class PromptLookup:
    """The continuation of the latest earlier occurrence of the last n tokens (n from max_ngram down).

    Text that quotes, rewrites or continues its context (code edits, summaries, lists) repeats long runs
    of it; free-form text rarely matches, and then nothing is proposed and the pass is a plain one."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, ids: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):  # latest first; the tail itself excluded
                if ids[start:start + n] == tail:
                    follow = ids[start + n:start + n + k]
                    if follow:
                        return follow
        return []


class DraftModel:
    """Greedy drafts from a small local causal LM of the same tokenizer, with its own cache kept between
    passes (cut back to what the session still shares with it)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self._cache = None
        self._held: list[int] = []  # the tokens in the cache

    @torch.no_grad()
    def propose(self, ids: list[int], k: int) -> list[int]:
        common = 0
        limit = min(len(self._held), len(ids) - 1)  # at least one token is fed, for its logits
        while common < limit and self._held[common] == ids[common]:
            common += 1
        if self._cache is None:
            self._cache, common = compat.new_kv_cache(self.model.config), 0
        else:
            compat.kv_crop(self._cache, compat.kv_length(self._cache, 0) - common)
        x = torch.tensor([ids[common:]])
        out: list[int] = []
        for _ in range(k):
            logits = compat.lm_logits_with_cache(self.model, x, self._cache)
            out.append(int(logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
        self._held = ids + out[:-1]
        return out


def load_draft(name: str, vocab_size: int) -> torch.nn.Module:
    """A small local model to draft with (any name `resolve_model` knows); its vocabulary must be the
    target's, token for token, or its drafts would mean other words."""
    from transformers import AutoModelForCausalLM

    from .sources import resolve_model

    source = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()
    if model.config.vocab_size != vocab_size:
        raise BadRequest(f"--draft {name}: its vocabulary has {model.config.vocab_size} tokens, the model's "
                         f"{vocab_size}", hint="a draft model must share the model's tokenizer")
    return model


def new_speculator(mode: str | int, draft: torch.nn.Module | None = None) -> "Speculator | None":
    """A session's speculator: None when off; drafts from `draft` if given, else by prompt lookup."""
    if mode == "off":
        return None
    return Speculator(DraftModel(draft) if draft is not None else PromptLookup(), mode)


def parse_speculate(text: str | int | None) -> str | int:
    """`off`, `auto` or a fixed number of drafts per pass (1..MAX_DRAFT)."""
    if text is None or text in ("off", 0, "0"):
        return "off"
    if text == "auto":
        return "auto"
    try:
        k = int(text)
    except (TypeError, ValueError):
        raise BadRequest(f"--speculate {text!r} is not off, auto or a number", hint="e.g. --speculate 4") from None
    if not 1 <= k <= MAX_DRAFT:
        raise BadRequest(f"--speculate {k} is outside 1..{MAX_DRAFT}")
    return k


def accept_draft(scores: torch.Tensor, draft: int, do_sample: bool,
                 rng: torch.Generator | None = None) -> tuple[bool, torch.Tensor]:
    """Keep or replace one draft given the processed scores [1, V] at its position: (kept, token [1])."""
    if not do_sample:
        token = scores.argmax(dim=-1)
        return bool(token[0] == draft), token
    probs = torch.softmax(scores, dim=-1)
    if float(torch.rand((), generator=rng)) < float(probs[0, draft]):
        return True, torch.tensor([draft])
    probs[0, draft] = 0.0  # the residual of p minus the one-hot proposal, renormalised by multinomial
    return False, torch.multinomial(probs, num_samples=1, generator=rng).squeeze(1)


@dataclass
class _Running:
    """A decayed sum, so estimates follow the recent passes."""

    value: float = 0.0
    weight: float = 0.0

    def add(self, x: float, w: float = 1.0) -> None:
        self.value = DECAY * self.value + x * w
        self.weight = DECAY * self.weight + w

    def mean(self, default: float) -> float:
        return self.value / self.weight if self.weight > 1e-9 else default


class Speculator:
    """A session's drafting policy and statistics; `mode` is "auto" or a fixed k."""

    def __init__(self, drafter: Drafter, mode: str | int = "auto") -> None:
        if mode == "off":
            raise ValueError("a Speculator with mode off: use no Speculator")
        self.drafter, self.mode = drafter, mode
        self.passes = self.drafted = self.accepted = self.tokens = 0
        self._accept = _Running()  # accepted drafts / (accepted + rejections): a geometric run's parameter
        self._plain = _Running()  # seconds of a one-token pass
        self._extra = _Running()  # seconds per extra token in a pass
        self._skipped = 0

    def draft(self, ids: list[int], limit: int) -> list[int]:
        """Drafts for the next pass, at most `limit` (the tokens the caller may still take, less one)."""
        k = min(self._choose_k(), limit)
        return self.drafter.propose(ids, k)[:k] if k > 0 else []

    def _choose_k(self) -> int:
        if self.mode != "auto":
            return int(self.mode)
        alpha = min(self._accept.mean(0.5), 0.99)
        t1 = self._plain.mean(1.0)
        c = self._extra.mean(0.0)
        best = max(range(MAX_DRAFT + 1), key=lambda k: (1 - alpha ** (k + 1)) / (1 - alpha) / (t1 + c * k))
        if best == 0:
            self._skipped += 1
            if self._skipped % EXPLORE_EVERY == 0:
                return 1
        return best

    def record_pass(self, tokens: int, seconds: float) -> None:
        """The wall time of a pass of `tokens` new tokens (prompt passes excluded by the caller)."""
        if tokens == 1:
            self._plain.add(seconds)
        else:
            extra = max(0.0, seconds - self._plain.mean(seconds)) / (tokens - 1)
            self._extra.add(extra)

    def record_outcome(self, drafted: int, accepted: int, produced: int) -> None:
        self.passes += 1
        self.tokens += produced
        if drafted:
            self.drafted += drafted
            self.accepted += accepted
            self._accept.add(accepted, accepted + (1 if accepted < drafted else 0))  # a rejection ends a run

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def summary(self) -> str:
        """The stats line's part: acceptance rate and tokens per pass."""
        per_pass = self.tokens / self.passes if self.passes else 0.0
        return (f"speculation: {self.acceptance:.0%} of {self.drafted} drafts accepted, "
                f"{per_pass:.2f} tokens per pass")
