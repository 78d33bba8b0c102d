"""Hidden-state compression on every hop: how often greedy output stays identical, and where it flips.

SmolLM2-135M-Instruct on 3 local spans of 10 blocks. For each codec the hidden states are encoded and
decoded at every boundary (client -> S1 -> S2 -> S3 -> client), for the prefill and every decode step,
exactly as on the wire. Greedy decoding of up to 64 new tokens for each chat prompt below is compared with
plain transformers `generate` on the same weights. Where a codec's tokens first differ, the exact model's
top-2 logit gap at that position is printed: a lossy code can only be expected to keep clear winners.

    .venv/bin/python bench/compression.py
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from mesh.model.chat import encode_messages
from mesh.model.generation import Generator, SamplingConfig
from mesh.model.head import load_tokenizer
from mesh.model.local import load_local
from mesh.model.sources import resolve_model
from mesh.net.codec import COMPRESSIONS, decode_tensor, encode_tensor, wire_size

NEW_TOKENS = 64
PROMPTS = [
    "List the planets of the solar system.",
    "What are the three primary colors?",
    "What is the capital of France? Answer in one sentence.",
    "Explain in a few sentences how a steam engine works.",
    "Write a haiku about autumn.",
    "Give me three tips for learning a new language.",
    "What is photosynthesis?",
    "Name three famous painters and one work of each.",
]


def through_codec(spans, head, tokenizer, ids: torch.Tensor, codec: str) -> list[int]:
    caches = [s.new_cache(1, ids.shape[1] + NEW_TOKENS) for s in spans]

    def squeeze(h: torch.Tensor) -> torch.Tensor:
        return decode_tensor(encode_tensor(h, codec))

    def run_blocks(hidden, pos, mask, position):
        for span, cache in zip(spans, caches):
            hidden = span(squeeze(hidden), pos, cache, mask)
        return squeeze(hidden)

    config = SamplingConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=[tokenizer.eos_token_id],
                            pad_token_id=tokenizer.pad_token_id)
    return Generator(head, run_blocks, tokenizer).generate(ids, None, config)[0].tolist()


def top2_gap(model, prompt: torch.Tensor, prefix: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([prompt[0].tolist() + prefix])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def main() -> None:
    source = resolve_model("smollm2")
    tokenizer = load_tokenizer(source)
    head, spans = load_local(source, num_spans=3)
    exact = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()
    hidden = torch.randn(1, 1, source.config.hidden_size)
    print(f"model {source.model_id}, 3 spans, {len(PROMPTS)} chat prompts, greedy up to {NEW_TOKENS} tokens, "
          "reference: transformers generate")
    print(f"{'codec':10} {'bytes/value':>12} {'identical':>10}   first difference (token index: exact top-2 gap)")
    for codec in COMPRESSIONS:
        size = wire_size(encode_tensor(hidden, codec)) / hidden.numel()
        same, flips = 0, []
        for text in PROMPTS:
            ids = encode_messages(tokenizer, [{"role": "user", "content": text}])
            ref = exact.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
            mine = through_codec(spans, head, tokenizer, ids, codec)
            k = next((i for i in range(min(len(mine), len(ref))) if mine[i] != ref[i]), None)
            if k is None and len(mine) == len(ref):
                same += 1
            else:
                k = k if k is not None else min(len(mine), len(ref))
                flips.append(f"{k}: {top2_gap(exact, ids, ref[:k]):.4f}")
        print(f"{codec:10} {size:12.2f} {f'{same} / {len(PROMPTS)}':>10}   {', '.join(flips) or '-'}")


if __name__ == "__main__":
    main()
