"""Seconds per fine-tuning step through the swarm vs peft and vs locally, per method, in one run.

Starts 3 `mesh serve` processes with SmolLM2-135M-Instruct (10 blocks each) on loopback; one step is the
forward, the backward and the optimizer update for a batch of 4 rows × 64 tokens. The baseline a user
would pick instead is peft on plain transformers in this process: LoRA (same rank, alpha and target
modules), prompt tuning (same number of virtual tokens) and, for deep prompts, prefix tuning (the closest
peft method: trained keys and values per layer instead of trained inputs per block). Local runs mesh's own
step on the full model in this process. Prints the median of `--repeats` steps each, interleaved, and
peft / swarm and local / swarm (1.0 = as fast as the swarm).

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
from mesh.api.tuning import Adapter, LocalRunner, SwarmRunner, TuningConfig, adapted_logits, lm_loss

BATCH, TOKENS = 4, 64


def step_seconds(head, runner, adapter, optimizer, ids) -> float:
    t0 = time.perf_counter()
    mask = torch.ones_like(ids)
    loss, _ = lm_loss(adapted_logits(head, runner, adapter, ids, mask), ids)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def peft_model(method: str, path: str, num_prompts: int, spec: LoraSpec):
    """The same method as peft would train it, on a fresh copy of the model."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if method == "lora":
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0,
                            task_type=TaskType.CAUSAL_LM)
    elif method == "prompt":
        config = PromptTuningConfig(num_virtual_tokens=num_prompts, task_type=TaskType.CAUSAL_LM)
    else:
        config = PrefixTuningConfig(num_virtual_tokens=num_prompts, task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(base, config)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def peft_step_seconds(model, optimizer, ids) -> float:
    t0 = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
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
    print(f"{'method':<12}{'peft s/step':>13}{'local s/step':>14}{'swarm s/step':>14}{'peft / swarm':>14}"
          f"{'local / swarm':>15}")
    extra = ["--threads", str(args.server_threads)] if args.server_threads else []
    with LocalSwarm("smollm2", 30, servers=3, extra=extra) as swarm, \
            DistributedModelForCausalLM.from_pretrained("smollm2", swarm.initial_peers) as model:
        for method in ("prompt", "deep-prompt", "lora"):
            tuning = TuningConfig(method, num_prompts=16, lora=LoraSpec())
            adapter = Adapter(full.config, tuning, generator=torch.Generator().manual_seed(0))
            optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
            swarm_runner = SwarmRunner(model, micro_batch=args.micro_batch)
            reference, ref_optimizer = peft_model(method, str(source.path), tuning.num_prompts, tuning.lora)
            times: dict[str, list[float]] = {"peft": [], "local": [], "swarm": []}
            for i in range(args.repeats + 1):  # the first round warms up each
                t = peft_step_seconds(reference, ref_optimizer, ids)
                if i:
                    times["peft"].append(t)
                for name, runner, h in (("local", local_runner, head), ("swarm", swarm_runner, model.head)):
                    t = step_seconds(h, runner, adapter, optimizer, ids)
                    if i:
                        times[name].append(t)
            ref, loc, swm = (statistics.median(times[k]) for k in ("peft", "local", "swarm"))
            print(f"{method:<12}{ref:>13.3f}{loc:>14.3f}{swm:>14.3f}{ref / swm:>14.3f}{loc / swm:>15.3f}", flush=True)

if __name__ == "__main__":
    main()
