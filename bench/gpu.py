"""Generation on a GPU: plain transformers, `mesh generate --local`, and a 3-server loopback swarm, in one run.

For SmolLM2-135M-Instruct and for a random Llama (hidden size 4096, grouped-query attention) with as many
blocks as fill 70% of the GPU's free memory, each at the device's default dtype:

- transformers: `AutoModelForCausalLM.generate` on the device (what a user would run instead);
- mesh local: mesh's head, spans and generation loop in one process on the device (`mesh generate --local`);
- mesh swarm: 3 `mesh serve --device <this one>` processes on loopback, the client's head on the device too;

batch-1 greedy decoding of 64 new tokens after a 16-token prompt, medians of interleaved repeats, and the
ratios between them. Each model is loaded one way at a time, so the three never share the GPU's memory.
On a machine without CUDA or Apple MPS it says so and exits 0.

    .venv/bin/python bench/gpu.py [--repeats 3] [--models smollm2,filler] [--fill 0.7] [--device auto]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from inference import NEW_TOKENS, swarm_blocks, timed_hf, timed_mesh
from mesh import DistributedModelForCausalLM
from mesh.cli.localswarm import LocalSwarm
from mesh.model.device import Device
from mesh.model.generation import LocalSpans
from mesh.model.local import load_local
from mesh.model.measure import block_bytes
from mesh.model.sources import resolve_model

FILLER = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
              num_key_value_heads=8, max_position_embeddings=4096, pad_token_id=0, bos_token_id=None,
              eos_token_id=None)


def filler_folder(device: Device, share: float, root: Path) -> Path:
    """A random Llama whose blocks take about `share` of the device's free memory, saved as an HF folder."""
    config = LlamaConfig(num_hidden_layers=1, **FILLER)
    per_block = block_bytes(config, "none", device.dtype)
    head = 2 * config.vocab_size * config.hidden_size * torch.empty(0, dtype=device.dtype).element_size()
    config.num_hidden_layers = max(2, int((share * device.free_memory() - head) // per_block))
    folder = root / f"filler-{config.num_hidden_layers}"
    with torch.device("cpu"):
        LlamaForCausalLM(config).to(device.dtype).save_pretrained(folder)
    print(f"filler: {config.num_hidden_layers} blocks of {per_block / 2**20:.0f} MiB at {device.dtype_name}")
    return folder


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(name: str, device: Device, repeats: int) -> dict[str, float]:
    source = resolve_model(name)
    ids = torch.randint(3, min(source.config.vocab_size, 30000), (1, 16), generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {"transformers": [], "mesh local": [], "mesh swarm": []}

    def hf_rate() -> float:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=device.dtype).to(device.torch).eval()
        try:
            timed_hf(model, ids.to(device.torch), 4)  # warm-up
            return timed_hf(model, ids.to(device.torch), NEW_TOKENS)[1]
        finally:
            del model
            release()

    def local_rate() -> float:
        head, spans = load_local(source, device.dtype, 3, device.torch)
        try:
            run = lambda m: nullcontext(LocalSpans(spans, 1, m))  # noqa: E731
            timed_mesh(run, head, None, ids, 4)
            return timed_mesh(run, head, None, ids, NEW_TOKENS)[1]
        finally:
            del head, spans
            release()

    for _ in range(repeats):
        rates["transformers"].append(hf_rate())
        rates["mesh local"].append(local_rate())
    extra = ["--device", str(device.torch), "--dtype", device.dtype_name, "--quant", "none"]
    with LocalSwarm(str(source.path), source.num_blocks, 3, extra=extra) as swarm:
        with DistributedModelForCausalLM.from_pretrained(str(source.path), swarm.initial_peers, device=device.torch,
                                                         dtype=device.dtype) as model:
            run = lambda m: swarm_blocks(model, m)  # noqa: E731
            timed_mesh(run, model.head, None, ids, 4)
            for _ in range(repeats):
                rates["mesh swarm"].append(timed_mesh(run, model.head, None, ids, NEW_TOKENS)[1])
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="smollm2,filler")
    parser.add_argument("--fill", type=float, default=0.7, help="share of free GPU memory the filler's blocks take")
    parser.add_argument("--device", default="auto", help="auto: a GPU if there is one; cpu runs the same steps there "
                        "(a check of this script, not a GPU figure)")
    args = parser.parse_args()
    device = Device.choose(args.device)
    if device.type == "cpu" and args.device == "auto":
        print("no GPU here (neither CUDA nor Apple MPS): bench/gpu.py measures GPU runs only; nothing to do")
        return
    print(f"device {device.name}, dtype {device.dtype_name}, {device.free_memory() / 2**30:.1f} GiB free; "
          f"{NEW_TOKENS} new tokens, batch 1, greedy; medians of {args.repeats} runs")
    print(f"{'model':24} {'transformers tok/s':>19} {'local tok/s':>12} {'swarm tok/s':>12} "
          f"{'local/hf':>9} {'swarm/hf':>9} {'swarm/local':>12}")
    with tempfile.TemporaryDirectory(prefix="mesh-gpu-") as tmp:
        for name in args.models.split(","):
            model = str(filler_folder(device, args.fill, Path(tmp))) if name == "filler" else name
            r = measure(model, device, args.repeats)
            hf, local, swarm = r["transformers"], r["mesh local"], r["mesh swarm"]
            print(f"{Path(model).name:24} {hf:19.1f} {local:12.1f} {swarm:12.1f} {local / hf:9.3f} "
                  f"{swarm / hf:9.3f} {swarm / local:12.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
