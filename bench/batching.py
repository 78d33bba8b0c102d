"""Concurrent clients on one swarm against transformers' batched `generate` on the same machine, in one run.

First, decode steps of B sessions through one span, one by one and as one batched pass (no network), and
two fine-tuning clients' forward and backward passes, one after the other and as one batch.
Then starts 3 `mesh serve` processes with SmolLM2-135M-Instruct (10 blocks each) on loopback. For N = 1, 2, 4,
8 and 16 clients, N sessions (each its own thread, as N users would be) decode 32 greedy tokens after
different prompts at the same time; then plain transformers generates the same N prompts as one
left-padded batch in this process: the ceiling of this machine, where no network or second process
takes a share. Printed per N: aggregate tokens/s, per-client tokens/s, p50 and p95 of the step time
(between two tokens of one client), the ceiling, and the ratios: aggregate / one client, aggregate /
ceiling, p95 / the solo p50.

    .venv/bin/python bench/batching.py [--clients 1,2,4,8,16] [--tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
from transformers import AutoModelForCausalLM

from mesh import DistributedModelForCausalLM
from mesh.cli.localswarm import LocalSwarm
from mesh.model.head import load_tokenizer
from mesh.model.sources import resolve_model

TOPICS = ["the printing press", "the steam engine", "the telescope", "paper money", "the compass", "the clock",
          "the microscope", "the telephone", "the bicycle", "the radio", "vaccines", "the railway", "glass",
          "the windmill", "the camera", "the light bulb"]


def prompts(tokenizer, n: int) -> list[torch.Tensor]:
    return [tokenizer(f"Write a short history of {TOPICS[i % len(TOPICS)]}.", return_tensors="pt")["input_ids"]
            for i in range(n)]


def swarm_run(model, ids: list[torch.Tensor], tokens: int) -> tuple[float, list[float], list[float]]:
    """Wall time, each client's tokens/s and every step time of N clients decoding at once."""
    stamps: list[list[float]] = [[] for _ in ids]
    start = threading.Barrier(len(ids))
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with model.inference_session(max_length=ids[i].shape[1] + tokens + 8) as session:
                start.wait(timeout=60)
                model.generate(ids[i], max_new_tokens=tokens, eos_token_id=[], session=session,
                               on_token=lambda _: stamps[i].append(time.perf_counter()))
        except BaseException as e:  # reported after the others finish
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ids))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]
    wall = max(s[-1] for s in stamps) - t0
    rates = [(len(s) - 1) / (s[-1] - s[0]) for s in stamps]
    steps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return wall, rates, steps


def ceiling(hf, tokenizer, ids: list[torch.Tensor], tokens: int) -> float:
    """Tokens/s of transformers generating all prompts as one left-padded batch."""
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": [i[0].tolist() for i in ids]}, return_tensors="pt")
    t0 = time.perf_counter()
    hf.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id or 0)
    return len(ids) * tokens / (time.perf_counter() - t0)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def span_passes(source, steps: int = 20) -> None:
    """Decode steps of B sessions through one span (10 SmolLM2 blocks, no network): one by one, and as one
    pass (`model/batch.py`): the gain a server gets when its compute is the bottleneck."""
    from mesh.model.batch import Row, run_rows
    from mesh.model.span import load_span

    span = load_span(source.path, source.config, 0, 10)
    h = source.config.hidden_size
    print(f"one span of 10 blocks, {steps} decode steps per session after 40 prompt tokens, no network")
    print(f"{'threads':>7} {'sessions':>9} {'one by one tok/s':>17} {'one pass tok/s':>15} {'ratio':>6}")
    default = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for b in (1, 2, 4, 8, 16):
            alone, together = ([span.new_cache(1, 128) for _ in range(b)] for _ in range(2))
            with torch.no_grad():
                for cache in alone + together:
                    span(torch.randn(1, 40, h), torch.arange(40)[None], cache)
                t0 = time.perf_counter()
                for _ in range(steps):
                    for cache in alone:
                        span(torch.randn(1, 1, h), torch.tensor([[cache.length]]), cache)
                t1 = time.perf_counter()
                for _ in range(steps):
                    run_rows(span, [Row(c, torch.randn(1, 1, h), torch.tensor([[c.length]])) for c in together])
                t2 = time.perf_counter()
            print(f"{threads:>7} {b:>9} {b * steps / (t1 - t0):>17.0f} {b * steps / (t2 - t1):>15.0f} "
                  f"{(t1 - t0) / (t2 - t1):>6.2f}")
    torch.set_num_threads(default)
    print()


def training_passes(source, rounds: int = 3) -> None:
    """Forward and backward of two fine-tuning clients' batches (4 rows × 64 tokens each) through one span:
    one after the other, and as one batch of 8 rows."""
    from mesh.model.span import load_span

    span = load_span(source.path, source.config, 0, 10)
    h = source.config.hidden_size
    xs = [torch.randn(4, 64, h) for _ in range(2)]
    pos = torch.arange(64).expand(4, 64)

    def both_alone() -> None:
        for x in xs:
            span.backward(x, torch.ones_like(x), pos)

    def together() -> None:
        x = torch.cat(xs)
        span.backward(x, torch.ones_like(x), torch.cat([pos, pos]))

    times = {"alone": [], "together": []}
    for _ in range(rounds):
        for name, fn in (("alone", both_alone), ("together", together)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    alone, joint = (statistics.median(times[k]) for k in ("alone", "together"))
    print(f"training: two clients' forward + backward (4 × 64 tokens each) through 10 blocks: {alone * 1e3:.0f} ms "
          f"one after the other, {joint * 1e3:.0f} ms as one batch (ratio {alone / joint:.2f})\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    source = resolve_model("smollm2")
    span_passes(source)
    training_passes(source)
    tokenizer = load_tokenizer(source)
    hf = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()
    rows = []
    with LocalSwarm("smollm2", source.num_blocks, 3) as swarm:
        with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers) as model:
            swarm_run(model, prompts(tokenizer, 2), 4)  # warm-up
            for n in counts:
                ids = prompts(tokenizer, n)
                wall, rates, steps = swarm_run(model, ids, args.tokens)
                rows.append((n, n * args.tokens / wall, statistics.mean(rates), percentile(steps, 50),
                             percentile(steps, 95), ceiling(hf, tokenizer, ids, args.tokens)))
    solo_rate, solo_p50 = rows[0][1], rows[0][3]
    print(f"SmolLM2-135M-Instruct, 3 servers on loopback, {args.tokens} greedy tokens per client, "
          f"{torch.get_num_threads()} threads here")
    print(f"{'clients':>7} {'aggregate tok/s':>16} {'per client':>11} {'p50 step ms':>12} {'p95 step ms':>12} "
          f"{'transformers':>13} {'agg / 1 client':>15} {'agg / ceiling':>14} {'p95 / solo p50':>15}")
    for n, agg, per, p50, p95, ceil in rows:
        print(f"{n:>7} {agg:>16.1f} {per:>11.1f} {p50 * 1e3:>12.1f} {p95 * 1e3:>12.1f} {ceil:>13.1f} "
              f"{agg / solo_rate:>15.2f} {agg / ceil:>14.2f} {p95 / solo_p50:>15.2f}")


if __name__ == "__main__":
    main()
