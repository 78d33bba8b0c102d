"""Blocks per GPU for popular models, at each dtype and quantization, as `mesh serve --blocks auto` counts them.

Each model's block is built from its published config (the numbers below, copied from the configs on the
hub) on the meta device, so nothing is downloaded; the count is the server's own `blocks_that_fit` rule:
weights at the served width (a MoE block's experts included), plus each block's share of the default
attention-cache budget (32768 tokens of 4096-token sessions; a sliding-window block holds its window and
the rollback slack of each), after a reserve for one 4096-token request. A 24 GB and an 80 GB card are
taken as 23 and 79 GiB usable (the CUDA context and the allocator keep about a GiB).

    .venv/bin/python bench/memory.py
"""

from __future__ import annotations

import math

import torch
from transformers import (BloomConfig, FalconConfig, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          MixtralConfig, Phi3Config, Qwen2Config, Qwen3Config)

from mesh.balancing.placement import blocks_for_memory
from mesh.model.measure import block_bytes, cache_bytes_per_block, work_bytes
from mesh.net import defaults

GIB = 2**30
CARDS = {"24 GB": 23 * GIB, "80 GB": 79 * GIB}
MODES = [("float32", torch.float32, "none"), ("bfloat16", torch.bfloat16, "none"),
         ("int8", torch.float16, "int8"), ("nf4", torch.bfloat16, "nf4")]


def llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab)


MODELS = {
    "Llama-2-7B": llama(4096, 11008, 32, 32, 32, 32000),
    "Llama-2-13B": llama(5120, 13824, 40, 40, 40, 32000),
    "Llama-2-70B": llama(8192, 28672, 80, 64, 8, 32000),
    "Llama-3.1-8B": llama(4096, 14336, 32, 32, 8, 128256),
    "Llama-3.1-70B": llama(8192, 28672, 80, 64, 8, 128256),
    "Llama-3.1-405B": llama(16384, 53248, 126, 128, 8, 128256),
    "Mistral-7B": MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "Qwen2.5-72B": Qwen2Config(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                               num_attention_heads=64, num_key_value_heads=8, vocab_size=152064),
    "Qwen3-32B": Qwen3Config(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                             num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "Mixtral-8x7B": MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                  num_experts_per_tok=2, vocab_size=32000, sliding_window=None),
    "Mixtral-8x22B": MixtralConfig(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                                   num_attention_heads=48, num_key_value_heads=8, num_local_experts=8,
                                   num_experts_per_tok=2, vocab_size=32768, sliding_window=None),
    "Gemma-2-27B": Gemma2Config(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                                num_attention_heads=32, num_key_value_heads=16, head_dim=128, sliding_window=4096,
                                vocab_size=256000),
    "Gemma-3-27B": Gemma3TextConfig(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                                    num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                    sliding_window=1024, vocab_size=262208,
                                    layer_types=["full_attention" if i % 6 == 5 else "sliding_attention"
                                                 for i in range(62)]),
    "Phi-3-medium": Phi3Config(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                               num_attention_heads=40, num_key_value_heads=10, vocab_size=32064),
    "Falcon-40B": FalconConfig(hidden_size=8192, num_hidden_layers=60, num_attention_heads=128, num_kv_heads=8,
                               new_decoder_architecture=True, parallel_attn=True, alibi=False, bias=False,
                               vocab_size=65024),
    "BLOOM-176B": BloomConfig(hidden_size=14336, n_layer=70, n_head=112, vocab_size=250880),
}


def main() -> None:
    """A markdown table: blocks per card (cards for the whole model) per card size, dtype and quantization."""
    print(f"Blocks per card (cache budget {defaults.CACHE_TOKENS} tokens, one {defaults.MAX_LENGTH}-token request "
          f"reserved); in brackets, cards for the whole model.\n")
    columns = [f"{mode} {card}" for card in CARDS for mode, _, _ in MODES]
    print("| model | blocks | GB/block bf16 | " + " | ".join(columns) + " |")
    print("|---" * (3 + len(columns)) + "|")
    for name, config in MODELS.items():
        n = config.num_hidden_layers
        cells = []
        for budget in CARDS.values():
            for _, dtype, quant in MODES:
                weights = block_bytes(config, quant, dtype)
                cache = cache_bytes_per_block(config, defaults.CACHE_TOKENS, dtype, defaults.MAX_LENGTH)
                work = work_bytes(config, defaults.MAX_LENGTH, dtype)
                if budget - work < weights + cache:
                    cells.append("0")
                    continue
                fit = blocks_for_memory(budget, weights, cache, work, n)
                cells.append(f"{fit} ({math.ceil(n / fit)})")
        per_block = block_bytes(config, "none", torch.bfloat16) / 1e9
        print(f"| {name} | {n} | {per_block:.2f} | " + " | ".join(cells) + " |", flush=True)
    print("\nSliding-window models, bfloat16 cache per block: windowed layers trimmed (as served) / every token "
          "kept; nf4 blocks per 24 GB card either way")
    for name, config in MODELS.items():
        if not getattr(config, "sliding_window", None):
            continue
        kept, every = (cache_bytes_per_block(config, defaults.CACHE_TOKENS, torch.bfloat16, length) / 1e9
                       for length in (defaults.MAX_LENGTH, None))
        weights = block_bytes(config, "nf4", torch.bfloat16)
        work = work_bytes(config, defaults.MAX_LENGTH, torch.bfloat16)
        fits = [blocks_for_memory(CARDS["24 GB"], weights, c * 1e9, work, config.num_hidden_layers)
                for c in (kept, every)]
        print(f"- {name}: {kept:.3f} / {every:.3f} GB; {fits[0]} / {fits[1]} blocks")


if __name__ == "__main__":
    main()
