"""Tokens per second through 3 servers over an emulated WAN, with speculative decoding off and on.

Runs in the network lab (bench/labswarm.py; needs root): 3 `mesh serve` processes with equal spans of
SmolLM2, every link delayed by --delay-ms one way. A client in its own namespace answers two chat
prompts greedily (stopping at end of turn), three runs each (the first warms up), with:
- speculation off (one pass through the chain per token), the baseline;
- `--speculate auto` with prompt lookup (the default drafter);
- `--speculate auto --draft smollm2`: SmolLM2 drafting for itself. No smaller model with its tokenizer is
  on this machine, so this row is an upper bound on acceptance at the cost of a full local model.
Greedy output must be the same in every mode; the script checks it. Printed per workload and mode:
tokens/s, its ratio to off, the share of drafts accepted and the mean tokens per pass.

    .venv/bin/python bench/speculative.py [--delay-ms 25] [--mbit 100] [--tokens 128]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from labswarm import lab_arguments, lab_swarm

from mesh.model.sources import resolve_model

LABCLIENT = Path(__file__).resolve().parent.parent / "tests" / "labclient.py"

CODE = '''def summarize(items, limit=10):
    """Count each item and return the most common ones with their share."""
    counts = {}
    for item in items:
        key = item.strip().lower()
        if not key:
            continue
        counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)
    result = []
    for key, count in ranked[:limit]:
        result.append((key, count, count / total))
    return result
'''
WORKLOADS = {
    "repetitive (rewrite code)": "Rewrite this Python function, renaming the parameter `items` to `words`. "
                                 "Reply with the code only.\n\n" + CODE,
    "free-form chat answer": "Explain in a few sentences how a steam engine works.",
}
MODES = {
    "off": ["--speculate", "off"],
    "prompt lookup (auto)": ["--speculate", "auto"],
    "draft model (auto)": ["--speculate", "auto", "--draft", "smollm2"],
}


def run_client(swarm, model: str, prompt: str, tokens: int, extra: list[str]) -> dict:
    argv = [sys.executable, str(LABCLIENT), model, "--peer", swarm.boot, "--chat", "--prompt-text", prompt,
            "--new-tokens", str(tokens), "--runs", "3", *extra]
    done = subprocess.run(["ip", "netns", "exec", swarm.user.ns, *argv], capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        sys.exit(f"the lab client failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    a = lab_arguments(__doc__.splitlines()[0], tokens=128, logs="/tmp/mesh-spec-logs")
    source = resolve_model(a.model)
    rows = []
    with lab_swarm(a.model, source.num_blocks, a.servers, a.delay_ms, a.mbit, a.logs) as swarm:
        for workload, prompt in WORKLOADS.items():
            base_tokens, base_rate = None, None
            for mode, extra in MODES.items():
                runs = run_client(swarm, a.model, prompt, a.tokens, extra)["runs"][1:]  # the first warms up
                tokens = runs[0]["tokens"]
                if base_tokens is None:
                    base_tokens = tokens
                same = all(r["tokens"] == base_tokens for r in runs)
                rate = sum(len(r["tokens"]) for r in runs) / sum(r["seconds"] for r in runs)
                base_rate = base_rate or rate
                drafted = sum(r["drafted"] for r in runs)
                accepted = sum(r["accepted"] for r in runs)
                per_pass = sum(len(r["tokens"]) for r in runs) / sum(r["passes"] for r in runs)
                rows.append((workload, mode, len(tokens), rate, rate / base_rate,
                             accepted / drafted if drafted else 0.0, per_pass, same))
    print(f"model {source.model_id}, {a.servers} servers, {a.delay_ms:g} ms one way per link "
          f"(lab RTT client <-> s1 {swarm.rtt * 1e3:.1f} ms), {a.mbit:g} Mbit/s per host, greedy, "
          f"2 measured runs per row")
    print(f"{'workload':28} {'mode':22} {'tokens':>6} {'tok/s':>7} {'vs off':>7} {'accepted':>9} "
          f"{'tok/pass':>9}  same output as off")
    for workload, mode, n, rate, ratio, acc, per_pass, same in rows:
        print(f"{workload:28} {mode:22} {n:6d} {rate:7.2f} {ratio:7.2f} {acc:9.0%} {per_pass:9.2f}  "
              f"{'yes' if same else 'NO'}")
    print("targets: >= 1.6x on the repetitive workload, >= 0.95x on free-form")


if __name__ == "__main__":
    main()
