"""Quantized spans of SmolLM2-135M-Instruct against float32, measured in one run.

Per mode: bytes per block, decode-step time per block (batch 1, one token, after a 32-token prefill),
the largest logit error over a 64-token greedy run fed the float32 run's tokens (teacher forcing), how
many of 64 free-running greedy tokens equal float32's before the first difference, and the relative L2
error of the middle span's (blocks 10:20) output on real hidden states (the float32 first span's output).

    .venv/bin/python bench/quant.py
"""

from __future__ import annotations

import time

import torch

from mesh.model.chat import encode_messages
from mesh.model.generation import Generator, LocalSpans, SamplingConfig
from mesh.model.head import load_head, load_tokenizer
from mesh.model.local import split_evenly
from mesh.model.quant import quantizer, tensor_bytes
from mesh.model.sources import resolve_model
from mesh.model.span import load_span

MODES = [("float32", "none", torch.float32), ("bfloat16", "none", torch.bfloat16),
         ("int8", "int8", torch.float32), ("nf4", "nf4", torch.float32), ("nf4 + bf16", "nf4", torch.bfloat16)]


def main() -> None:
    source = resolve_model("smollm2")
    tok, head = load_tokenizer(source), load_head(source)
    ids = encode_messages(tok, [{"role": "user", "content": "Explain in a few sentences how a bicycle works."}])
    n = source.num_blocks
    results, reference, ref_logits = [], None, None
    real = mid_ref = None  # real hidden states entering the middle span, and its float32 output
    for label, mode, dtype in MODES:
        spans = [load_span(source.path, source.config, a, b, dtype, quantizer(mode, dtype))
                 for a, b in split_evenly(n, 3)]
        with torch.no_grad():
            if real is None:
                pos = torch.arange(ids.shape[1])[None]
                real = spans[0](head.embed(ids), pos)
                mid_ref = spans[1](real, pos)
            mid = spans[1](real.to(dtype), torch.arange(ids.shape[1])[None]).float()
        rel = ((mid - mid_ref).norm() / mid_ref.norm()).item()
        per_block = sum(tensor_bytes(s) for s in spans) / n
        blocks = LocalSpans(spans, 1, ids.shape[1] + 70)
        config = SamplingConfig(max_new_tokens=64, eos_token_ids=[])
        tokens = Generator(head, blocks, tok).generate(ids, None, config)[0].tolist()
        # decode-step time per block
        cache_spans = LocalSpans(spans, 1, 64)
        x = torch.randn(1, 32, source.config.hidden_size)
        with torch.no_grad():
            cache_spans(x, torch.arange(32)[None], None, 0)
            times = []
            for i in range(10):
                t0 = time.perf_counter()
                cache_spans(x[:, :1], torch.tensor([[32 + i]]), None, 32 + i)
                times.append(time.perf_counter() - t0)
        step_ms = sorted(times)[len(times) // 2] / n * 1e3
        # teacher-forced logits over the float32 tokens
        full = torch.cat([ids, torch.tensor([reference or tokens])], dim=1)
        with torch.no_grad():
            h = head.embed(full)
            pos = torch.arange(full.shape[1])[None]
            for s in spans:
                h = s(h, pos)
            logits = head.logits(h.float())[0, ids.shape[1] - 1:]
        if reference is None:
            reference, ref_logits = tokens, logits
        err = (logits - ref_logits).abs().max().item()
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
        results.append((label, per_block, step_ms, err, same, rel))
    print(f"\nSmolLM2 spans per mode (3 spans of 10 blocks, CPU, torch threads {torch.get_num_threads()})")
    print(f"{'mode':12} {'MB/block':>9} {'decode ms/block':>16} {'max dlogit':>11} {'greedy same /64':>16} "
          f"{'rel err 10:20':>14}")
    for label, per_block, step_ms, err, same, rel in results:
        print(f"{label:12} {per_block / 1e6:9.2f} {step_ms:16.3f} {err:11.3f} {same:16d} {rel:14.1e}")


if __name__ == "__main__":
    main()
