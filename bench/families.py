"""Per-block throughput of each family's span against plain transformers on the same config, in one run.

For every family the tests check (the tiny random configs of tests/conftest.py: 6 blocks, hidden size
64), the same 6 blocks run two ways on the same weights and inputs, interleaved, one thread:
- mesh: `Span.forward` with its own cache (what a server runs);
- transformers: the family's base model (`model.model` / `model.transformer`) with its own DynamicCache,
  fed `inputs_embeds` so that only the blocks (and the final norm) run.
Decode: 32 single-token steps after a 16-token prompt; prefill: one 128-token pass. Figures are block
steps per second (decode) and block-tokens per second (prefill); the ratio is mesh / transformers
(target ≥ 0.9).

Then Mixtral's router against a dense block of the same active size (a Mistral block whose MLP is as
wide as the two experts a token uses), hidden 512, 8 experts of width 1024, top 2: tokens per second per
block at batch sizes 1 to 256 tokens, and how many experts a batch touches. A batch-1 step reads 2
experts' weights; a batch of 16 tokens already touches nearly all 8, so batching a MoE block gains less
than batching a dense one.

What `--blocks auto` sizes for each family's published models: bench/memory.py.

    .venv/bin/python bench/families.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers as tf
from transformers import DynamicCache

from mesh.model.span import span_from_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tiny  # noqa: E402  (the tests' tiny configs: the bench measures what they check)

FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "mistral", "mixtral", "phi3", "gemma2", "gemma3", "falcon",
            "falcon40", "falcon_rw", "bloom")
PROMPT, STEPS, PREFILL = 16, 32, 128


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "model", None) or model.transformer


def ours(model: torch.nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
    span = span_from_model(model, 0, model.config.num_hidden_layers)
    h = model.config.hidden_size
    prompt, steps, long = torch.randn(1, PROMPT, h), torch.randn(STEPS, 1, 1, h), torch.randn(1, PREFILL, h)

    def decode() -> None:
        cache = span.new_cache(1, PROMPT + STEPS)
        span(prompt, torch.arange(PROMPT)[None], cache)
        for t in range(STEPS):
            span(steps[t], torch.tensor([[PROMPT + t]]), cache)

    def prefill() -> None:
        span(long, torch.arange(PREFILL)[None])

    return decode, prefill


def theirs(model: torch.nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
    base, h = base_of(model), model.config.hidden_size
    prompt, steps, long = torch.randn(1, PROMPT, h), torch.randn(STEPS, 1, 1, h), torch.randn(1, PREFILL, h)

    def decode() -> None:
        cache = DynamicCache(config=model.config)
        base(inputs_embeds=prompt, cache=cache, use_cache=True)
        for t in range(STEPS):
            base(inputs_embeds=steps[t], cache=cache, use_cache=True)

    def prefill() -> None:
        base(inputs_embeds=long, use_cache=False)

    return decode, prefill


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(kind: str, repeats: int) -> tuple[float, float, float, float]:
    model = make_tiny(kind)
    blocks = model.config.num_hidden_layers
    runs = {"ours": ours(model), "theirs": theirs(model)}
    times: dict[tuple[str, int], list[float]] = {(w, i): [] for w in runs for i in (0, 1)}
    with torch.no_grad():
        for fns in runs.values():  # warm-up
            fns[0](), fns[1]()
        for _ in range(repeats):
            for who, fns in runs.items():
                for i in (0, 1):
                    times[who, i].append(timed(fns[i]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return (blocks * STEPS / med["ours", 0], blocks * STEPS / med["theirs", 0],
            blocks * PREFILL / med["ours", 1], blocks * PREFILL / med["theirs", 1])


def moe_against_dense(repeats: int) -> None:
    common = dict(vocab_size=128, hidden_size=512, num_attention_heads=8, num_key_value_heads=8,
                  num_hidden_layers=1, sliding_window=None)
    moe = tf.MixtralForCausalLM(tf.MixtralConfig(**common, intermediate_size=1024, num_local_experts=8,
                                                 num_experts_per_tok=2)).eval()
    dense = tf.MistralForCausalLM(tf.MistralConfig(**common, intermediate_size=2048)).eval()
    spans = {"mixtral": span_from_model(moe, 0, 1), "dense": span_from_model(dense, 0, 1)}
    print("\nMixtral block (8 experts × 1024, top 2) vs dense block (MLP 2048: same active size), hidden 512")
    print(f"{'tokens':>7} {'MoE tok/s':>10} {'dense tok/s':>12} {'MoE/dense':>10} {'experts touched':>16}")
    router = moe.model.layers[0].mlp.gate
    for n in (1, 4, 16, 64, 256):
        x, pos = torch.randn(1, n, 512), torch.arange(n)[None]
        with torch.no_grad():
            logits = torch.nn.functional.linear(x[0], router.weight)
            touched = logits.topk(2, dim=-1).indices.unique().numel()
            rates = {}
            for name, span in spans.items():
                span(x, pos)
                rates[name] = n / statistics.median(timed(lambda: span(x, pos)) for _ in range(repeats * 4))
        print(f"{n:>7} {rates['mixtral']:>10.0f} {rates['dense']:>12.0f} {rates['mixtral'] / rates['dense']:>10.2f}"
              f" {touched:>13} / 8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"transformers {tf.__version__}, torch {torch.__version__}, 1 thread; median of {args.repeats} rounds")
    print(f"{'family':<10} {'decode mesh':>12} {'transformers':>13} {'ratio':>6} "
          f"{'prefill mesh':>13} {'transformers':>13} {'ratio':>6}")
    worst = float("inf")
    for kind in FAMILIES:
        dm, dt, pm, pt = compare(kind, args.repeats)
        worst = min(worst, dm / dt, pm / pt)
        print(f"{kind:<10} {dm:>12.0f} {dt:>13.0f} {dm / dt:>6.2f} {pm:>13.0f} {pt:>13.0f} {pm / pt:>6.2f}")
    print(f"lowest ratio: {worst:.2f} (target ≥ 0.9)")
    moe_against_dense(args.repeats)


if __name__ == "__main__":
    main()
