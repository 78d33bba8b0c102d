"""What spot checks cost, and how fast they catch a cheater, measured in one run.

Starts 3 `mesh serve` processes of SmolLM2-135M-Instruct on loopback, each holding all 30 blocks (so a
chain is one server, and the two others can check it and referee), then:

1. Overhead: greedy generation of 64 new tokens after a 64-token prompt with `verify` 0, 0.05 and 0.2,
   interleaved over the repeats (tokens/s include each answer's final check); plain transformers
   `generate` on the same weights is printed beside them.
2. Time to catch: a 4th server whose span lies (tests/cheater.py) on a fraction f of its steps; the
   client is routed through it until it is caught. Over 20 seeded runs per setting (verify 0.05 and 0.2,
   f = 1 and 0.1), the number of steps from its first lie to its ban: median and worst.
3. The bytes commitments add to a step's frames (first, on real frames); with `--tolerances`, each
   position's error under bf16, int8 and nf4 (what checks must forgive).

    .venv/bin/python bench/verify.py [--repeats 3] [--runs 20]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import torch
from transformers import AutoModelForCausalLM

from mesh import DistributedModelForCausalLM
from mesh.cli.localswarm import LocalSwarm
from mesh.model.errors import Rewind
from mesh.model.head import load_tokenizer
from mesh.model.sources import resolve_model
from mesh.net.chain import BanList
from mesh.net.inference import CHECK_LAG

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 64
PROMPT = "The history of the printing press begins in the fifteenth century, when " * 8


def tokens_per_second(model, ids: torch.Tensor, verify: float) -> float:
    model.verify = verify
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)


def hf_tokens_per_second(hf, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False, pad_token_id=0)
    return NEW_TOKENS / (time.perf_counter() - t0)


def steps_to_catch(model, ids: torch.Tensor, cheater: str, verify: float, seed: int, limit: int = 160) -> int | None:
    """Steps from the cheater's first lie to its ban in one seeded run (None: not caught within `limit`)."""
    model.bans, model.verify = BanList(), verify
    model.accept = lambda s: s.peer_id == cheater or cheater in model.bans.convicted
    prompt = ids.shape[1]
    with model.inference_session(prompt + limit + 1) as session:
        session.remote.cfg.checker.rng = random.Random(seed)
        steps, caught = [0], []
        run = session.generator.run_blocks

        def counting(hidden, position_ids, mask, position):
            steps[0] += 1
            try:
                return run(hidden, position_ids, mask, position)
            except Rewind as r:  # the check that caught it: the first lie was at position r.position
                if not caught:
                    caught.append(steps[0] - 1 - max(0, r.position - prompt + 1))
                raise

        session.generator.run_blocks = counting
        for _ in model.stream(ids, session=session, max_new_tokens=limit, eos_token_id=[]):
            if caught:
                break
    return caught[0] if caught else None


def start_cheater(fraction: float, peers: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, str(ROOT / "tests" / "cheater.py"), "1", str(fraction), "0", "serve", "smollm2",
            "--blocks", "0:30", "--listen", "/ip4/127.0.0.1/tcp/0", "--new-identity", "--announce-period", "1",
            "--threads", "1", "--initial-peers", peers[0]]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "mesh: serving blocks" in text:
            return proc, text.split("mesh: listening on ", 1)[1].split()[0].rsplit("/p2p/", 1)[1]
        if proc.poll() is not None:
            raise RuntimeError(f"the cheater exited:\n{text[-2000:]}")
        time.sleep(0.2)
    raise TimeoutError("the cheater did not start")


def commitment_bytes() -> None:
    """Bytes the commitments add to a step's frames, measured on real frames of SmolLM2's hidden size."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    from mesh.net.commitments import Commitment
    from mesh.net.messages import StepResult

    key = create_new_key_pair().private_key
    for tokens in (1, 32):
        out = torch.randn(1, tokens, 576)
        bare = len(msgpack.packb(StepResult(1, 100, out).to_wire()))
        signed = [Commitment.make(key, "s" * 32, 100, out) for _ in range(3)]
        with_three = len(msgpack.packb(StepResult(1, 100, out, signed).to_wire()))
        print(f"commitments of a 3-hop chain, step of {tokens} token(s): {with_three - bare} bytes "
              f"({(with_three - bare) / 3 / tokens:.1f} per hop per token; the step's hidden states: {bare} bytes)")


def position_errors() -> None:
    """Each position's relative error after 10 blocks of SmolLM2, quantized (or bf16) vs float32: what
    spot checks must forgive (net/verify.py QUANT_ERROR)."""
    from mesh.model.head import load_head
    from mesh.model.quant import quantizer
    from mesh.model.span import load_span

    source = resolve_model("smollm2")
    tok, head = load_tokenizer(source), load_head(source)
    texts = [PROMPT, "What is the capital of France? Answer with one word.",
             "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# the 10th number is"]
    inputs = [tok(t, return_tensors="pt")["input_ids"][:, :64] for t in texts]
    inputs.append(torch.randint(100, 20000, (1, 60), generator=torch.Generator().manual_seed(0)))
    kinds = {"bfloat16": ("none", torch.bfloat16), "int8": ("int8", torch.float32), "nf4": ("nf4", torch.float32)}
    print("\none position's relative L2 error after 10 blocks, vs float32, over the positions of 4 texts")
    for a, b in ((0, 10), (10, 20), (20, 30)):
        before = load_span(source.path, source.config, 0, a) if a else None
        exact = load_span(source.path, source.config, a, b)
        for name, (mode, dtype) in kinds.items():
            span = load_span(source.path, source.config, a, b, dtype, quantizer(mode, dtype))
            errors = []
            for ids in inputs:
                pos = torch.arange(ids.shape[1])[None]
                with torch.no_grad():
                    h = head.embed(ids) if before is None else before(head.embed(ids), pos)
                    ref, out = exact(h, pos), span(h.to(dtype), pos).float()
                errors.append(((out - ref).norm(dim=-1) / ref.norm(dim=-1))[0])
            e = torch.cat(errors)
            print(f"  blocks {a}:{b} {name:>8}: median {e.median():.3f}, p99 {e.quantile(0.99):.3f}, "
                  f"max {e.max():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20, help="seeded runs per cheating setting (0: skip them)")
    parser.add_argument("--bytes-only", action="store_true", help="print the commitments' size and stop")
    parser.add_argument("--tolerances", action="store_true", help="print per-position quantization errors and stop")
    args = parser.parse_args()
    commitment_bytes()
    if args.bytes_only:
        return
    if args.tolerances:
        position_errors()
        return
    source = resolve_model("smollm2")
    ids = load_tokenizer(source)(PROMPT, return_tensors="pt")["input_ids"][:, :64]
    hf = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()
    rates = (0.0, 0.05, 0.2)
    with LocalSwarm("smollm2", 30, servers=1, replicas=3) as swarm:
        with DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers) as model:
            tokens_per_second(model, ids[:, :8], 0.2)  # warm-up, checkers included
            results: dict[float, list[float]] = {r: [] for r in rates}
            hf_results = []
            for _ in range(args.repeats):
                hf_results.append(hf_tokens_per_second(hf, ids))
                for rate in rates:
                    results[rate].append(tokens_per_second(model, ids, rate))
            print(f"\n3 servers of SmolLM2 (all 30 blocks each) on loopback, {NEW_TOKENS} new tokens after a "
                  f"{ids.shape[1]}-token prompt, median of {args.repeats} rounds (overhead: the median of each "
                  f"round's ratio to --verify 0, which the machine's drift between rounds does not move)")
            print(f"  transformers generate          {statistics.median(hf_results):6.1f} tokens/s")
            for rate in rates:
                tps = statistics.median(results[rate])
                ratio = statistics.median(v / b for v, b in zip(results[rate], results[0.0]))
                print(f"  mesh swarm, --verify {rate:<4}      {tps:6.1f} tokens/s   "
                      f"overhead {100 * (1 - ratio):5.1f}% of --verify 0 (rounds: "
                      f"{', '.join(f'{100 * (1 - v / b):.0f}%' for v, b in zip(results[rate], results[0.0]))})")
            if not args.runs:
                return

            print(f"\nsteps from a cheater's first lie to its ban, {args.runs} seeded runs each")
            for fraction in (1.0, 0.1):
                cheat, cheater = start_cheater(fraction, swarm.initial_peers, swarm.log_dir / f"cheater-{fraction}.log")
                try:
                    model.client.call(lambda: model.client.swarm.wait_for(
                        lambda t: t.get(cheater) is not None, 30))
                    for verify in (0.05, 0.2):
                        found = [steps_to_catch(model, ids[:, :16], cheater, verify, seed) for seed in range(args.runs)]
                        caught = sorted(s for s in found if s is not None)
                        missed = len(found) - len(caught)
                        median, worst = (statistics.median(caught), max(caught)) if caught else ("-", "-")
                        bound = math.ceil(2 / verify) + CHECK_LAG + 1
                        print(f"  lies on {fraction:>4.0%} of steps, --verify {verify:<4}: median {median}, "
                              f"worst {worst} steps (bound {bound}){f', {missed} not caught' if missed else ''}")
                finally:
                    cheat.kill()
                    cheat.wait(10)


if __name__ == "__main__":
    main()
