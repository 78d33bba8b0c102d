"""Throughput measurement of one block, its cache, and memory sizes per block."""

from __future__ import annotations

import torch

from mesh.model.device import Device
from mesh.model.measure import cache_bytes_per_block, cached, measure_block, measurement_key


def test_measure_block_and_cache(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    decode, forward = measure_block(config, Device.cpu(), "none")
    assert decode > 0 and forward > decode  # long sequences amortise per-call costs
    calls = []

    def run() -> dict:
        calls.append(1)
        return {"inference_rps": decode, "forward_rps": forward}

    key = measurement_key("tiny", Device.cpu(), "none")
    assert "threads=" in key and "quant=none" in key and "device=cpu" in key
    first, hit1 = cached(tmp_path, key, run)
    second, hit2 = cached(tmp_path, key, run)
    assert (hit1, hit2, len(calls)) == (False, True, 1) and first == second
    _, hit3 = cached(tmp_path, key, run, fresh=True)
    assert not hit3 and len(calls) == 2
    _, hit4 = cached(tmp_path, measurement_key("tiny", Device.cpu(torch.bfloat16), "none"), run)
    assert not hit4  # another dtype is another entry

    # K and V of 1000 tokens, 2 KV heads of 16 values, 4 bytes each
    assert cache_bytes_per_block(config, 1000, torch.float32) == 2 * 1000 * 2 * 16 * 4


def test_windowed_blocks_count_their_window_of_each_session():
    """Gemma 3's layout: 5 sliding-window layers (window 1024) in 6. Sessions of 4096 tokens: a windowed
    layer holds 1024 - 1 + the rollback slack of each; a global one all 4096; a config without a window or
    sessions of unknown length count every token."""
    from transformers import Gemma3TextConfig

    from mesh.model.compat import ROLLBACK_SLACK

    types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(12)]
    config = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=1024,
                              layer_types=types)
    every = cache_bytes_per_block(config, 32768, torch.bfloat16)
    assert every == 2 * 32768 * 2 * 16 * 2
    share = (1023 + ROLLBACK_SLACK) / 4096
    assert cache_bytes_per_block(config, 32768, torch.bfloat16, 4096) == every * (1 + 5 * share) / 6
    assert cache_bytes_per_block(config, 32768, torch.bfloat16, 512) == every  # sessions within the window
