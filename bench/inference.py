"""Routed inference against plain transformers on the same weights, measured in one run.

Starts 3 `mesh serve` processes with SmolLM2-135M-Instruct (10 blocks each, one compute thread each) on
loopback, then measures batch-1 greedy generation of 64 new tokens and the time to first token for a
128-token prompt in four ways, interleaved:

- transformers: `AutoModelForCausalLM.generate` on the same weights with 1 thread, and with 2 threads
  (what a user would run instead of a swarm, on the same machine);
- local: mesh's own head, spans and generation loop in one process (2 threads);
- swarm: the same generation loop through the 3 servers.

    .venv/bin/python bench/inference.py [--model smollm2] [--servers 3] [--repeats 3] [--compression none]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from mesh import DistributedModelForCausalLM
from mesh.cli.localswarm import LocalSwarm
from mesh.model.generation import Generator, LocalSpans, SamplingConfig
from mesh.model.head import load_tokenizer
from mesh.model.local import load_local
from mesh.model.sources import resolve_model

NEW_TOKENS = 64
PROMPT_TOKENS = 128
Timing = tuple[float, float]  # (seconds to first token, decode tokens/s after it)


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    text = "The history of the printing press begins in the fifteenth century, when " * 40
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :n]


class _Stamps:
    """A transformers streamer that only notes when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def rate_of(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def timed_mesh(run_blocks_factory, head, tokenizer, ids: torch.Tensor, new_tokens: int) -> Timing:
    stamps: list[float] = []
    with run_blocks_factory(ids.shape[1] + new_tokens) as run_blocks:
        gen = Generator(head, run_blocks, tokenizer)
        config = SamplingConfig(max_new_tokens=new_tokens, eos_token_ids=[])
        t0 = time.perf_counter()
        gen.generate(ids, None, config, on_token=lambda _: stamps.append(time.perf_counter()))
    return stamps[0] - t0, rate_of(stamps) if len(stamps) > 1 else 0.0


def timed_hf(model, ids: torch.Tensor, new_tokens: int) -> Timing:
    stamps = _Stamps()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0, streamer=stamps)
    return stamps.times[0] - t0, rate_of(stamps.times) if len(stamps.times) > 1 else 0.0


@contextmanager
def swarm_blocks(model, max_length: int):
    """One inference session through the swarm, closed after the run."""
    with model.inference_session(max_length) as session:
        yield session.run_blocks


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
    hf = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()
    short, long = prompt_ids(tokenizer, 16), prompt_ids(tokenizer, PROMPT_TOKENS)
    default_threads = torch.get_num_threads()

    with LocalSwarm(args.model, source.num_blocks, args.servers) as swarm:
        with DistributedModelForCausalLM.from_pretrained(args.model, swarm.initial_peers,
                                                         compression=args.compression) as model:
            with model.inference_session(64) as probe:
                route = probe.describe()
            ways: dict[str, tuple[int, Callable[[torch.Tensor, int], Timing]]] = {
                "transformers, 1 thread": (1, lambda ids, n: timed_hf(hf, ids, n)),
                "transformers, 2 threads": (2, lambda ids, n: timed_hf(hf, ids, n)),
                "mesh local": (default_threads, lambda ids, n: timed_mesh(
                    lambda m: nullcontext(LocalSpans(spans, 1, m)), head, tokenizer, ids, n)),
                "mesh swarm": (default_threads, lambda ids, n: timed_mesh(
                    lambda m: swarm_blocks(model, m), model.head, tokenizer, ids, n)),
            }
            results: dict[str, list[Timing]] = {name: [] for name in ways}
            for threads, run in ways.values():  # warm-up
                torch.set_num_threads(threads)
                run(short, 4)
            for _ in range(args.repeats):
                for name, (threads, run) in ways.items():
                    torch.set_num_threads(threads)
                    _, rate = run(short, NEW_TOKENS)
                    ttft, _ = run(long, 2)
                    results[name].append((ttft, rate))
            torch.set_num_threads(default_threads)
    report(source.model_id, args, route, results)


def report(model_id: str, args, route: str, results: dict[str, list[Timing]]) -> None:
    rate = {k: statistics.median(r for _, r in v) for k, v in results.items()}
    ttft = {k: statistics.median(t for t, _ in v) for k, v in results.items()}
    print(f"model {model_id}, {args.servers} servers on loopback ({route}), compression {args.compression}; "
          f"medians of {args.repeats} interleaved runs")
    print(f"{'':26} {'decode tok/s':>13} {'swarm / this':>13} {'TTFT 128 s':>11} {'swarm / this':>13}")
    for name in results:
        print(f"{name:26} {rate[name]:13.2f} {rate['mesh swarm'] / rate[name]:13.3f} {ttft[name]:11.3f} "
              f"{ttft['mesh swarm'] / ttft[name]:13.3f}")


if __name__ == "__main__":
    main()
