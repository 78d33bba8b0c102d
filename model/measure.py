"""How fast this host runs one block, and how much memory a span needs.

The speed is measured on one block with random weights, converted as served (dtype, quantization), so a
server knows its throughput before it chooses its blocks. Results are cached per (host, model, dtype,
quantization, threads) in `throughput.json` under the cache folder, behind a file lock, so servers
starting together on one host measure one at a time and a restart skips the measurement.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import PretrainedConfig

from . import compat
from .quant import bytes_per_block, quantizer
from .span import Span, block_params

__all__ = ["measure_block", "measurement_key", "cached", "available_memory", "default_budget", "block_bytes",
           "cache_bytes_per_block", "work_bytes"]

log = logging.getLogger("mesh.measure")

DECODE_STEPS = 32
FORWARD_TOKENS = 256
FORWARD_REPEATS = 3
CACHE_FILE = "throughput.json"
MEMORY_SHARE = 0.5  # of the available memory, when no budget is given


def measure_block(config: PretrainedConfig, dtype: torch.dtype, quant: str) -> tuple[float, float]:
    """(decode steps/s, forward tokens/s) of one block: single-token steps with a growing cache after a
    short prefill, and FORWARD_TOKENS-token forward passes without a cache."""
    config = compat.ensure_attention(config)
    layer = compat.build_layer(compat.family_of(config), config, 0).to(dtype)
    hook = quantizer(quant, dtype)
    span = Span(config, 0, 1, [hook(layer, 0) if hook else layer], dtype)
    h = config.hidden_size
    with torch.no_grad():
        x = torch.randn(1, FORWARD_TOKENS, h, dtype=dtype)
        pos = torch.arange(FORWARD_TOKENS)[None]
        span(x, pos)  # warm-up
        t0 = time.perf_counter()
        for _ in range(FORWARD_REPEATS):
            span(x, pos)
        forward = FORWARD_REPEATS * FORWARD_TOKENS / (time.perf_counter() - t0)
        cache = span.new_cache(1, 16 + DECODE_STEPS + 1)
        span(x[:, :16], pos[:, :16], cache)
        span(x[:, 16:17], pos[:, 16:17], cache)  # warm-up
        t0 = time.perf_counter()
        for i in range(DECODE_STEPS):
            span(x[:, 17 + i:18 + i], pos[:, 17 + i:18 + i], cache)
        decode = DECODE_STEPS / (time.perf_counter() - t0)
    return decode, forward


def measurement_key(model_id: str, dtype: torch.dtype, quant: str) -> str:
    """What a cached throughput measurement depends on: host, model, dtype, quantization, threads."""
    cpu = platform.processor() or platform.machine()
    return (f"host={platform.node()}|cpu={cpu}|model={model_id}|dtype={str(dtype).removeprefix('torch.')}"
            f"|quant={quant}|threads={torch.get_num_threads()}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached(folder: Path, key: str, measure: Callable[[], dict], fresh: bool = False) -> tuple[dict, bool]:
    """The cached result under `key`, or `measure()` stored there. Returns (result, came from the cache)."""
    path = folder / CACHE_FILE
    with _locked(path):
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        if not fresh and key in table:
            return table[key], True
        result = measure()
        table[key] = result
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return result, False


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_budget() -> int:
    """Bytes a server takes without --max-memory: a share of what is free."""
    return int(MEMORY_SHARE * available_memory())


def block_bytes(config: PretrainedConfig, quant: str, dtype: torch.dtype) -> float:
    """Bytes of one block's weights at this dtype and quantization."""
    linear, other = block_params(config)
    return bytes_per_block(linear, other, quant, dtype)


def cache_bytes_per_block(config: PretrainedConfig, tokens: int, dtype: torch.dtype) -> float:
    """Keys and values of `tokens` cached tokens in one block."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * tokens * heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def work_bytes(config: PretrainedConfig, tokens: int, dtype: torch.dtype) -> float:
    """Peak activations of one request of `tokens` tokens through one block, forward and backward (blocks
    run one at a time, so this does not grow with the span): ~10 hidden-size and 4 MLP-size tensors."""
    inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return tokens * (10 * config.hidden_size + 4 * inter) * torch.empty(0, dtype=dtype).element_size()
