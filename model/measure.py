"""How fast this host runs one block, and how much memory a span needs.

The speed is measured on one block with random weights, converted as served (device, dtype, quantization),
so a server knows its throughput before it chooses its blocks. GPUs run kernels asynchronously, so the
timed regions synchronize the device and last long enough to average out launch jitter. Results are
cached per (host, device name, model, dtype, quantization, threads) in `throughput.json` under the cache
folder, behind a file lock, so servers starting together on one host measure one at a time and a restart
skips the measurement.
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
from .device import Device
from .quant import bytes_per_block, quantizer
from .span import Span, block_params

__all__ = ["measure_block", "measurement_key", "cached", "default_budget", "block_bytes",
           "cache_bytes_per_block", "work_bytes"]

log = logging.getLogger("mesh.measure")

DECODE_STEPS = 32  # at least this many timed single-token steps …
FORWARD_TOKENS = {"cpu": 256, "gpu": 1024}  # tokens per timed forward pass: a replay chunk on a CPU, a training
                                             # micro-batch (4 rows of 256) on a GPU, where small passes idle it
MIN_SECONDS = 0.3  # … and timed regions of at least this long, so fast GPU steps are not lost in timer noise
MAX_STEPS = 1024
CACHE_FILE = "throughput.json"
MEMORY_SHARE = 0.5  # of the available memory, when no budget is given


def _timed(device: Device, step: Callable[[int], None], least: int) -> float:
    """Calls of `step(i)` per second, synchronizing the device around the timed region: at least `least`
    calls and MIN_SECONDS, at most MAX_STEPS calls."""
    device.synchronize()
    t0, n = time.perf_counter(), 0
    while n < least or (time.perf_counter() - t0 < MIN_SECONDS and n < MAX_STEPS):
        step(n)
        n += 1
        if n >= least:
            device.synchronize()
    return n / (time.perf_counter() - t0)


def measure_block(config: PretrainedConfig, device: Device, quant: str) -> tuple[float, float]:
    """(decode steps/s, forward tokens/s) of one block on `device`: single-token steps with a growing cache
    after a short prefill, and forward passes of a realistic size without a cache."""
    config = compat.ensure_attention(config)
    layer = compat.build_layer(compat.family_of(config), config, 0).to(device.dtype)
    hook = quantizer(quant, device.dtype, device.torch)
    span = Span(config, 0, 1, [(hook(layer, 0) if hook else layer).to(device.torch)], device.dtype)
    tokens = FORWARD_TOKENS["cpu" if device.type == "cpu" else "gpu"]
    with torch.no_grad():
        x = device.put(torch.randn(1, tokens, config.hidden_size), device.dtype)
        pos = device.put(torch.arange(tokens)[None])
        span(x, pos)  # warm-up
        forward = tokens * _timed(device, lambda _: span(x, pos), 3)
        cache = span.new_cache(1, 16 + MAX_STEPS + 2)
        span(x[:, :16], pos[:, :16], cache)
        span(x[:, 16:17], pos[:, 16:17], cache)  # warm-up
        step = device.put(torch.randn(1, 1, config.hidden_size), device.dtype)
        decode = _timed(device, lambda i: span(step, pos[:, :1] + 17 + i, cache), DECODE_STEPS)
    return decode, forward


def measurement_key(model_id: str, device: Device, quant: str) -> str:
    """What a cached throughput measurement depends on: host, device (by name), model, dtype, quantization,
    threads."""
    cpu = platform.processor() or platform.machine()
    return (f"host={platform.node()}|cpu={cpu}|device={device.name}|model={model_id}|dtype={device.dtype_name}"
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


def default_budget(device: Device) -> int:
    """Bytes a server takes without --max-memory: a share of what is free on its device."""
    return int(MEMORY_SHARE * device.free_memory())


def block_bytes(config: PretrainedConfig, quant: str, dtype: torch.dtype) -> float:
    """Bytes of one block's weights at this dtype and quantization."""
    linear, other = block_params(config)
    return bytes_per_block(linear, other, quant, dtype)


def cache_bytes_per_block(config: PretrainedConfig, tokens: int, dtype: torch.dtype,
                          max_length: int | None = None) -> float:
    """Keys and values of `tokens` cached tokens in one block, on average over the model's blocks. Given
    sessions of `max_length` tokens, a sliding-window block holds only its window (plus the rollback slack)
    of each (compat.WindowLayer): Gemma 3's five windowed blocks in six need a fraction of a global one's."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    full = 2 * tokens * heads * head_dim * torch.empty(0, dtype=dtype).element_size()
    window, n = getattr(config, "sliding_window", None), config.num_hidden_layers
    if not window or max_length is None or n == 0:
        return full
    windowed = sum(compat.layer_type(config, i) == compat.SLIDING for i in range(n))
    share = min(1.0, (window - 1 + compat.ROLLBACK_SLACK) / max_length)
    return full * (n - windowed + windowed * share) / n


def work_bytes(config: PretrainedConfig, tokens: int, dtype: torch.dtype) -> float:
    """Peak activations of one request of `tokens` tokens through one block, forward and backward (blocks
    run one at a time, so this does not grow with the span): ~10 hidden-size and 4 MLP-size tensors."""
    inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return tokens * (10 * config.hidden_size + 4 * inter) * torch.empty(0, dtype=dtype).element_size()
