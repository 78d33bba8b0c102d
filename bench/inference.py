"""Routed inference vs the same blocks in one process, measured in one run.

Starts 3 `mesh serve` processes with SmolLM2-135M-Instruct (10 blocks each) on loopback, then measures
batch-1 greedy generation of 64 new tokens and the time to first token for a 128-token prompt, through
the swarm and locally (same head, same spans, same generation loop), and prints the ratios.

    .venv/bin/python bench/inference.py [--model smollm2] [--servers 3] [--compression none]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mesh import DistributedModelForCausalLM
from mesh.cli.localswarm import LocalSwarm
from mesh.model.generation import Generator, LocalSpans, SamplingConfig
from mesh.model.head import load_tokenizer
from mesh.model.local import load_local
from mesh.model.sources import resolve_model

NEW_TOKENS = 64
PROMPT_TOKENS = 128


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    text = "The history of the printing press begins in the fifteenth century, when " * 40
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :n]


def timed(run_blocks_factory, head, tokenizer, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(seconds to first token, decode tokens/s after it)."""
    stamps = []
    gen = Generator(head, run_blocks_factory(ids.shape[1] + new_tokens), tokenizer)
    config = SamplingConfig(max_new_tokens=new_tokens, eos_token_ids=[])
    t0 = time.perf_counter()
    gen.generate(ids, None, config, on_token=lambda _: stamps.append(time.perf_counter()))
    ttft = stamps[0] - t0
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return ttft, rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compression", default="none")
    args = parser.parse_args()
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    head, spans = load_local(source, num_spans=args.servers)
    ids64 = prompt_ids(tokenizer, 16)
    ids128 = prompt_ids(tokenizer, PROMPT_TOKENS)

    def local_blocks(max_length):
        return LocalSpans(spans, 1, max_length)

    results: dict[str, list[tuple[float, float]]] = {"local": [], "swarm": []}
    with LocalSwarm(args.model, source.num_blocks, args.servers) as swarm:
        with DistributedModelForCausalLM.from_pretrained(args.model, swarm.initial_peers,
                                                         compression=args.compression) as model:
            route = None

            def swarm_blocks(max_length):
                nonlocal route
                session = model.inference_session(max_length)
                route = session.describe()
                return session.run_blocks

            timed(local_blocks, head, tokenizer, ids64, 4)  # warm-up both paths
            timed(swarm_blocks, model.head, tokenizer, ids64, 4)
            for _ in range(args.repeats):
                for name, factory, h in (("local", local_blocks, head), ("swarm", swarm_blocks, model.head)):
                    _, rate = timed(factory, h, tokenizer, ids64, NEW_TOKENS)
                    ttft, _ = timed(factory, h, tokenizer, ids128, 1 + 1)
                    results[name].append((ttft, rate))
    local_rate = statistics.median(r for _, r in results["local"])
    swarm_rate = statistics.median(r for _, r in results["swarm"])
    local_ttft = statistics.median(t for t, _ in results["local"])
    swarm_ttft = statistics.median(t for t, _ in results["swarm"])
    print(f"model {source.model_id}, {args.servers} servers on loopback ({route}), compression {args.compression}")
    print(f"{'':28} {'local':>10} {'swarm':>10} {'swarm/local':>12}")
    print(f"{'decode tokens/s (batch 1)':28} {local_rate:10.2f} {swarm_rate:10.2f} {swarm_rate / local_rate:12.3f}")
    print(f"{'time to first token, 128 tok':28} {local_ttft:10.3f} {swarm_ttft:10.3f} {swarm_ttft / local_ttft:12.3f}")


if __name__ == "__main__":
    main()
