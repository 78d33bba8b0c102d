"""Per-token time through 3 servers over an emulated WAN, next to its floor, measured in one run.

Builds a network lab (tests/netlab.py; needs root): a client host and one host per server, every host
to host crossing delayed by --delay-ms one way (userspace NFQUEUE stage) and every host's link capped
at --mbit in each direction (tbf). Each server runs `mesh serve` with an equal span of SmolLM2 and one
compute thread; the client generates greedily from a chat prompt inside its own namespace.

The floor is what any design that sends a token's hidden state through the servers in turn must pay:
the compute of the blocks and the head (measured here, in this process, with one thread, on the same
prompt and spans) plus one link delay per hop, (servers + 1) × delay: client → s1 → s2 → s3 → client.

    .venv/bin/python bench/wan.py [--servers 3] [--delay-ms 25] [--mbit 100] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import netlab  # noqa: E402
from procs import MeshProcess  # noqa: E402

from mesh.model.chat import encode_messages  # noqa: E402
from mesh.model.generation import Generator, LocalSpans, SamplingConfig  # noqa: E402
from mesh.model.head import load_tokenizer  # noqa: E402
from mesh.model.local import load_local  # noqa: E402
from mesh.model.sources import resolve_model  # noqa: E402

LABCLIENT = Path(__file__).resolve().parent.parent / "tests" / "labclient.py"
PROMPT = "Explain in a few sentences how a steam engine works."


def local_step_times(model: str, servers: int, ids: torch.Tensor, tokens: int) -> list[float]:
    """Seconds per new token (after the first) of the same spans and head, in this process."""
    source = resolve_model(model)
    head, spans = load_local(source, num_spans=servers)
    tokenizer = load_tokenizer(source)
    config = SamplingConfig(max_new_tokens=tokens, eos_token_ids=[])
    times = []
    for _ in range(2):  # the first run warms up
        stamps: list[float] = []
        gen = Generator(head, LocalSpans(spans, 1, ids.shape[1] + tokens), tokenizer)
        gen.generate(ids, None, config, on_token=lambda _: stamps.append(time.perf_counter()))
        times = [b - a for a, b in zip(stamps, stamps[1:])]
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--delay-ms", type=float, default=25.0)
    p.add_argument("--mbit", type=float, default=100.0)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--logs", type=Path, default=Path("/tmp/mesh-wan-logs"))
    a = p.parse_args()
    reason = netlab.unavailable()
    if reason:
        sys.exit(f"bench/wan.py: {reason}")
    source = resolve_model(a.model)
    tokenizer = load_tokenizer(source)
    ids = encode_messages(tokenizer, [{"role": "user", "content": PROMPT}])
    n = source.num_blocks
    bounds = [round(i * n / a.servers) for i in range(a.servers + 1)]
    a.logs.mkdir(parents=True, exist_ok=True)

    with netlab.Lab() as lab:
        user = lab.host("client")
        hosts = [lab.host(f"s{i + 1}") for i in range(a.servers)]
        for h in [user, *hosts]:
            lab.cap(h, a.mbit)
        lab.delay(a.delay_ms)
        lab_rtt = lab.rtt(user, hosts[0])  # the emulator itself: 2 x delay expected
        procs, boot = [], None
        for i, h in enumerate(hosts):
            args = ["serve", a.model, "--blocks", f"{bounds[i]}:{bounds[i + 1]}", "--listen",
                    f"/ip4/{h.ip}/tcp/31337", "--new-identity", "--threads", "1", "--bandwidth", str(a.mbit)]
            if boot:
                args += ["--initial-peers", boot]
            proc = MeshProcess(args, a.logs / f"server{i + 1}.log", env={"HF_HUB_OFFLINE": "1"}, netns=h.ns)
            lab.procs.append(proc.proc)
            procs.append(proc)
            addr = proc.wait_ready_sync(180)
            boot = boot or addr
        argv = [sys.executable, str(LABCLIENT), a.model, "--peer", boot, "--prompt-text", PROMPT,
                "--new-tokens", str(a.tokens), "--runs", "3"]
        done = subprocess.run(["ip", "netns", "exec", user.ns, *argv], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            sys.exit(f"the lab client failed:\n{done.stderr[-3000:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        for proc in procs:
            proc.cleanup()
    torch.set_num_threads(1)  # as each server computes
    local = local_step_times(a.model, a.servers, ids, a.tokens)
    swarm = [t for run in report["runs"][1:] for t in run["step_s"]]  # the first run warms up
    compute = statistics.median(local)
    floor = compute + (a.servers + 1) * a.delay_ms / 1e3
    per_token = statistics.median(swarm)
    print(f"model {source.model_id}, {a.servers} servers ({', '.join(f'{x}:{y}' for x, y in zip(bounds, bounds[1:]))}), "
          f"{a.delay_ms:g} ms one way per link, {a.mbit:g} Mbit/s per host, {a.tokens} new tokens")
    print(f"{'lab TCP round trip client <-> s1 (1 KB)':40} {lab_rtt * 1e3:8.1f} ms   (2 x delay = {2 * a.delay_ms:g} ms)")
    print(f"{'compute per token (local, 1 thread)':40} {compute * 1e3:8.1f} ms")
    print(f"{'floor: compute + (servers+1) x delay':40} {floor * 1e3:8.1f} ms")
    print(f"{'through the lab swarm (median)':40} {per_token * 1e3:8.1f} ms   "
          f"(p90 {statistics.quantiles(swarm, n=10)[-1] * 1e3:.1f} ms)")
    print(f"{'swarm / floor':40} {per_token / floor:8.3f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
