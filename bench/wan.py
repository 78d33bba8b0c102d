"""Per-token time through 3 servers over an emulated WAN, next to its floor, measured in one run.

Builds a network lab (tests/netlab.py; needs root): a client host and one host per server, every host
to host crossing delayed by --delay-ms one way (userspace NFQUEUE stage) and every host's link capped
at --mbit in each direction (tbf). Each server runs `mesh serve` with an equal span of SmolLM2 and one
compute thread; the client generates greedily from a chat prompt inside its own namespace.

The floor is what any design that sends a token's hidden state through the servers in turn must pay:
the compute of the blocks and the head (measured here, in this process, on the same prompt and spans, at
the thread counts of the lab run: 1 for the blocks, torch's default for the client's head) plus one link's
one-way time per hop, (servers + 1) × RTT / 2 with the lab's RTT measured in the same run:
client → s1 → s2 → s3 → client.

    .venv/bin/python bench/wan.py [--servers 3] [--delay-ms 25] [--mbit 100] [--tokens 64]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from labswarm import lab_arguments, lab_swarm, spans  # noqa: E402

from mesh.model.chat import encode_messages  # noqa: E402
from mesh.model.generation import Generator, LocalSpans, SamplingConfig  # noqa: E402
from mesh.model.head import load_tokenizer  # noqa: E402
from mesh.model.local import load_local  # noqa: E402
from mesh.model.sources import resolve_model  # noqa: E402

LABCLIENT = Path(__file__).resolve().parent.parent / "tests" / "labclient.py"
PROMPT = "Explain in a few sentences how a steam engine works."


def local_compute(model: str, servers: int, ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    """Median seconds per new token (after the first) of the same spans and of the head, in this process,
    each at the thread count it has in the lab: the blocks at 1 thread (as each server computes), the head
    and sampling at torch's default (as the lab client computes). Returns (blocks, head)."""
    source = resolve_model(model)
    head, spans = load_local(source, num_spans=servers)
    tokenizer = load_tokenizer(source)
    config = SamplingConfig(max_new_tokens=tokens, eos_token_ids=[])
    client_threads = torch.get_num_threads()
    medians = []
    for threads in (1, client_threads):
        torch.set_num_threads(threads)
        for _ in range(2):  # the first run warms up
            stamps: list[float] = []
            inside: list[float] = []  # seconds in the blocks, per call
            blocks = LocalSpans(spans, 1, ids.shape[1] + tokens)

            def run_blocks(*args, _blocks=blocks, _inside=inside):
                t0 = time.perf_counter()
                out = _blocks(*args)
                _inside.append(time.perf_counter() - t0)
                return out

            gen = Generator(head, run_blocks, tokenizer)
            gen.generate(ids, None, config, on_token=lambda _: stamps.append(time.perf_counter()))
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        in_blocks = inside[1:len(steps) + 1]  # the prefill is the first call
        medians.append((statistics.median(in_blocks), statistics.median(s - b for s, b in zip(steps, in_blocks))))
    torch.set_num_threads(client_threads)
    return medians[0][0], medians[1][1]


def main() -> None:
    a = lab_arguments(__doc__.splitlines()[0], tokens=64, logs="/tmp/mesh-wan-logs")
    source = resolve_model(a.model)
    tokenizer = load_tokenizer(source)
    ids = encode_messages(tokenizer, [{"role": "user", "content": PROMPT}])
    parts = spans(source.num_blocks, a.servers)
    with lab_swarm(a.model, source.num_blocks, a.servers, a.delay_ms, a.mbit, a.logs) as lab:
        argv = [sys.executable, str(LABCLIENT), a.model, "--peer", lab.boot, "--prompt-text", PROMPT,
                "--new-tokens", str(a.tokens), "--runs", "3"]
        done = subprocess.run(["ip", "netns", "exec", lab.user.ns, *argv], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            sys.exit(f"the lab client failed:\n{done.stderr[-3000:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        lab_rtt = lab.rtt
    blocks_s, head_s = local_compute(a.model, a.servers, ids, a.tokens)
    swarm = [t for run in report["runs"][1:] for t in run["step_s"]]  # the first run warms up
    compute = blocks_s + head_s
    one_way = lab_rtt / 2  # what the lab really adds per link, measured in this run
    floor = compute + (a.servers + 1) * one_way
    per_token = statistics.median(swarm)
    print(f"model {source.model_id}, {a.servers} servers ({', '.join(f'{x}:{y}' for x, y in parts)}), "
          f"{a.delay_ms:g} ms one way per link, {a.mbit:g} Mbit/s per host, {a.tokens} new tokens")
    print(f"{'lab TCP round trip client <-> s1 (1 KB)':44} {lab_rtt * 1e3:8.1f} ms   (2 x delay = {2 * a.delay_ms:g} ms)")
    print(f"{'compute per token: blocks (1 thread)':44} {blocks_s * 1e3:8.1f} ms")
    print(f"{'compute per token: head ({} threads)'.format(torch.get_num_threads()):44} {head_s * 1e3:8.1f} ms")
    print(f"{'floor: compute + (servers+1) x RTT/2':44} {floor * 1e3:8.1f} ms")
    print(f"{'through the lab swarm (median)':44} {per_token * 1e3:8.1f} ms   "
          f"(p90 {statistics.quantiles(swarm, n=10)[-1] * 1e3:.1f} ms)")
    print(f"{'swarm / floor':44} {per_token / floor:8.3f}   (target <= 1.10)")

if __name__ == "__main__":
    main()
