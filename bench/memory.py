"""Blocks per GPU for popular models, at each dtype and quantization, as `mesh serve --blocks auto` counts them.

Each model's block is built from its published config (the numbers below, copied from the configs on the
hub) on the meta device, so nothing is downloaded; the count is the server's own `blocks_that_fit` rule:
weights at the served width, plus each block's share of the default attention-cache budget (32768 tokens),
after a reserve for one 4096-token request. A 24 GB and an 80 GB card are taken as 23 and 79 GiB usable
(the CUDA context and the allocator keep about a GiB).

    .venv/bin/python bench/memory.py
"""

from __future__ import annotations

import math

import torch
from transformers import BloomConfig, LlamaConfig, MistralConfig, Qwen2Config

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
                cache = cache_bytes_per_block(config, defaults.CACHE_TOKENS, dtype)
                work = work_bytes(config, defaults.MAX_LENGTH, dtype)
                if budget - work < weights + cache:
                    cells.append("0")
                    continue
                fit = blocks_for_memory(budget, weights, cache, work, n)
                cells.append(f"{fit} ({math.ceil(n / fit)})")
        per_block = block_bytes(config, "none", torch.bfloat16) / 1e9
        print(f"| {name} | {n} | {per_block:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
