"""Speculative decoding in the generation loop, on local spans of tiny models: exact greedy output, the
sampled distribution unchanged (chi-square), and rollback of rejected drafts."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_tiny
from mesh.model import generation
from mesh.model.generation import Generator, LocalSpans, SamplingConfig
from mesh.model.head import head_from_model
from mesh.model.span import span_from_model
from mesh.model.speculative import DraftModel, PromptLookup, Speculator, parse_speculate

REPETITIVE = [[5, 17, 42, 99, 3, 64, 8, 21] * 3 + [5, 17, 42]]
PROMPT = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])  # for the 8-token sampler: prompt lookup drafts 3, 1, 2


def local(model, spans: int = 2):
    n = model.config.num_hidden_layers
    cuts = [round(i * n / spans) for i in range(spans + 1)]
    return head_from_model(model), [span_from_model(model, a, b) for a, b in zip(cuts, cuts[1:])]


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    assert lookup.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # the latest 3-gram match wins
    assert lookup.propose([4, 5, 6, 4, 5], 4) == [6, 4, 5]  # what follows, as far as it goes
    assert lookup.propose([1, 2, 3, 4], 4) == []  # no repeated n-gram: no drafts, a plain pass
    assert lookup.propose([7], 2) == []


def test_parse_speculate():
    assert parse_speculate("off") == "off" and parse_speculate("auto") == "auto" and parse_speculate("3") == 3
    for bad in ("9", "-1", "many"):
        try:
            parse_speculate(bad)
        except Exception as e:
            assert "--speculate" in str(e)
        else:
            raise AssertionError(bad)


def test_cli_refuses_a_bad_speculate_before_loading_anything():
    from typer.testing import CliRunner

    from mesh.cli.main import app

    result = CliRunner().invoke(app, ["generate", "no-such-model", "-p", "hi", "--local", "--speculate", "12"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --speculate 12 is outside 1..8"]


def test_greedy_with_speculation_equals_transformers():
    """Every mode and drafter, with a repetition penalty (its context must include accepted drafts)."""
    model = make_tiny("llama", layers=4)
    draft = make_tiny("llama", layers=2, seed=7)  # another model: its drafts are often wrong
    head, spans = local(model)
    for ids in (torch.tensor(REPETITIVE), torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))):
        for penalty in (1.0, 1.3):
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                 repetition_penalty=penalty, pad_token_id=0)[:, ids.shape[1]:]
            for mode, drafter in (("auto", PromptLookup()), (3, PromptLookup()), ("auto", DraftModel(draft)),
                                  (8, DraftModel(draft)), (8, DraftModel(model))):
                spec = Speculator(drafter, mode)
                gen = Generator(head, LocalSpans(spans, 1, 80), speculator=spec)
                out = gen.generate(ids, None, SamplingConfig(max_new_tokens=40, repetition_penalty=penalty))
                assert out.tolist() == ref.tolist(), (mode, type(drafter).__name__, penalty)
                assert spec.tokens == 40
                if drafter.__class__ is DraftModel and drafter.model is model and penalty == 1.0:
                    # the model drafting for itself is always right: 40 tokens in passes of 9
                    assert spec.acceptance == 1.0 and spec.passes == 5


def test_rejected_drafts_are_rolled_back_and_only_accepted_tokens_stay():
    """After every pass the caches hold exactly what the pass fed; the next pass starts at the accepted
    length, so rejected drafts never stay behind."""
    model = make_tiny("llama", layers=4)
    head, spans = local(model)
    blocks = LocalSpans(spans, 1, 64)
    calls: list[tuple[int, int, int]] = []  # (position, tokens fed, cache length after)

    def run_blocks(hidden, position_ids, mask, position):
        out = blocks(hidden, position_ids, mask, position)
        assert all(c.length == position + hidden.shape[1] for c in blocks.caches)
        calls.append((position, hidden.shape[1], blocks.caches[0].length))
        return out

    spec = Speculator(PromptLookup(), 4)
    gen = Generator(head, run_blocks, speculator=spec)
    ids = torch.tensor(REPETITIVE)
    gen.generate(ids, None, SamplingConfig(max_new_tokens=30))
    rollbacks = sum(pos < prev_len for (pos, _, _), (_, _, prev_len) in zip(calls[1:], calls))
    assert 0 < spec.accepted < spec.drafted and rollbacks > 0, (spec.accepted, spec.drafted)
    # the next call starts from the accepted tokens: the prompt and 30 new ones, the last not fed yet
    gen.generate(torch.tensor([[7]]), None, SamplingConfig(max_new_tokens=1))
    assert calls[-1][0] == ids.shape[1] + 29


def _tiny_sampler():
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
                      eos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked, uneven distributions: a biased sampler shows
    return model


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    keep = expected >= 5  # cells too small for the test are pooled into one
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]]) if (~keep).any() else counts[keep]
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]) if (~keep).any() else expected[keep]
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


def _critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability 0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def _token_counts(model, drafter_factory, runs: int, temperature: float) -> torch.Tensor:
    """How often each token came first and second in `runs` seeded generations: [2, V]."""
    head, spans = local(model, 1)
    counts = torch.zeros(2, model.config.vocab_size)
    config = SamplingConfig(max_new_tokens=3, do_sample=True, temperature=temperature)
    for seed in range(runs):
        torch.manual_seed(seed)
        gen = Generator(head, LocalSpans(spans, 1, 16), speculator=Speculator(drafter_factory(), 3))
        out = gen.generate(PROMPT, None, config)[0]
        counts[0, int(out[0])] += 1
        counts[1, int(out[1])] += 1
    return counts


def _exact_first_two(model, temperature: float) -> torch.Tensor:
    """The model's exact distributions of the first and (marginally) the second new token: [2, V]."""
    with torch.no_grad():
        first = torch.softmax(model(PROMPT).logits[0, -1] / temperature, -1)
        rows = torch.stack([torch.softmax(model(torch.cat([PROMPT, torch.tensor([[t]])], 1)).logits[0, -1]
                                          / temperature, -1) for t in range(len(first))])
    return torch.stack([first, first @ rows])


def _worst(counts: torch.Tensor, exact: torch.Tensor) -> float:
    """The larger of the two positions' chi-square statistics, as a multiple of its critical value."""
    return max(stat / _critical(df) for stat, df in (_chi_square(counts[i], exact[i]) for i in range(2)))


def test_speculative_sampling_keeps_the_distribution(monkeypatch):
    """The first two new tokens' empirical distributions over 600 seeded runs, against the model's exact
    ones, by chi-square at p = 0.001 each. Drafts decide both (kept, or resampled from the residual). The
    same test rejects a sampler that keeps every draft (at 200 runs its statistic is 60 times the critical
    value)."""
    model = _tiny_sampler()
    draft = make_tiny("llama", layers=1, seed=5)
    draft.resize_token_embeddings(8)  # a different model over the same 8-token vocabulary
    exact = _exact_first_two(model, 1.3)
    for factory in (PromptLookup, lambda: DraftModel(draft)):
        assert _worst(_token_counts(model, factory, 600, 1.3), exact) < 1

    monkeypatch.setattr(generation, "accept_draft", lambda scores, d, s, rng=None: (True, torch.tensor([d])))
    assert _worst(_token_counts(model, PromptLookup, 200, 1.3), exact) > 1
