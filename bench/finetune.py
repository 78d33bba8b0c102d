"""Seconds per fine-tuning step through the swarm vs locally, per method, measured in one run.

Starts 3 `mesh serve` processes with SmolLM2-135M-Instruct (10 blocks each) on loopback; one step is the
forward, the backward and the optimizer update for a batch of 4 rows × 64 tokens. Local runs the same
step on the full model in this process. Prints the median of `--repeats` steps each, interleaved, and
local / swarm (1.0 = as fast as local).

    .venv/bin/python bench/finetune.py [--repeats 3] [--micro-batch 4] [--server-threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from mesh import DistributedModelForCausalLM
from mesh.cli.localswarm import LocalSwarm
from mesh.model.head import head_from_model
from mesh.model.lora import LoraSpec
from mesh.model.sources import resolve_model
from mesh.model.span import span_from_model
from mesh.tuning import Adapter, LocalRunner, SwarmRunner, TuningConfig, adapted_logits, lm_loss

BATCH, TOKENS = 4, 64


def step_seconds(head, runner, adapter, optimizer, ids) -> float:
    t0 = time.perf_counter()
    mask = torch.ones_like(ids)
    loss, _ = lm_loss(adapted_logits(head, runner, adapter, ids, mask), ids)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per swarm request (they pipeline)")
    parser.add_argument("--server-threads", type=int, default=2,
                        help="compute threads per server (one chain keeps one server busy at a time; 0: "
                             "the cores split between servers)")
    args = parser.parse_args()
    source = resolve_model("smollm2")
    full = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()
    full.requires_grad_(False)
    local_runner, head = LocalRunner(span_from_model(full, 0, 30)), head_from_model(full)
    ids = torch.randint(100, 20000, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    print(f"SmolLM2-135M-Instruct, batch {BATCH} × {TOKENS} tokens, 3 servers of 10 blocks on this machine "
          f"({args.server_threads or 'split'} threads each), micro-batch {args.micro_batch}; local: torch's "
          f"{torch.get_num_threads()} threads")
    print(f"{'method':<12}{'local s/step':>14}{'swarm s/step':>14}{'local / swarm':>15}")
    extra = ["--threads", str(args.server_threads)] if args.server_threads else []
    with LocalSwarm("smollm2", 30, servers=3, extra=extra) as swarm, \
            DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers) as model:
        for method in ("prompt", "deep-prompt", "lora"):
            tuning = TuningConfig(method, num_prompts=16, lora=LoraSpec())
            adapter = Adapter(full.config, tuning, generator=torch.Generator().manual_seed(0))
            optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
            swarm_runner = SwarmRunner(model, micro_batch=args.micro_batch)
            times: dict[str, list[float]] = {"local": [], "swarm": []}
            for i in range(args.repeats + 1):  # the first round warms up both
                for name, runner, h in (("local", local_runner, head), ("swarm", swarm_runner, model.head)):
                    t = step_seconds(h, runner, adapter, optimizer, ids)
                    if i:
                        times[name].append(t)
            loc, swm = statistics.median(times["local"]), statistics.median(times["swarm"])
            print(f"{method:<12}{loc:>14.3f}{swm:>14.3f}{loc / swm:>15.3f}", flush=True)


if __name__ == "__main__":
    main()
