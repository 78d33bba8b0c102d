"""`mesh serve` whose span lies: run as `python cheater.py AFTER FRACTION SEED <mesh args…>`.

From the AFTER-th step of each inference session on, each step's output is perturbed (Gaussian noise
of 30% of the output's size) with probability FRACTION (seeded); every training backward's input
gradient is perturbed the same way. Forward passes (what referees run) stay honest. The product has no
such option: the test replaces the span's functions in this process only.
"""

import random
import sys

import torch

import mesh.model.span as span_module
import mesh.net.batching as batching
import mesh.net.sessions as sessions

after, fraction, seed = int(sys.argv.pop(1)), float(sys.argv.pop(1)), int(sys.argv.pop(1))
rng, steps, honest = random.Random(seed), {}, sessions._run_chunk  # steps: per session (cache)


def perturbed(t: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    return t + 0.3 * t.norm(dim=-1, keepdim=True) / t.shape[-1] ** 0.5 * noise


def lying(span, cache, step, a, b, lora):
    out = honest(span, cache, step, a, b, lora)
    n = steps[id(cache)] = steps.get(id(cache), 0) + 1
    if step.want_output and n >= after and rng.random() < fraction:
        out = perturbed(out, n)
    return out


honest_rows = batching.run_rows


def lying_rows(span, rows, lora=None):
    """The same lies when steps share a pass (net/batching.py): each row is its session's step."""
    outs = honest_rows(span, rows, lora)
    for i, row in enumerate(rows):
        n = steps[id(row.cache)] = steps.get(id(row.cache), 0) + 1
        if n >= after and rng.random() < fraction:
            outs[i] = perturbed(outs[i], n)
    return outs


honest_backward = span_module.Graph.backward


def lying_backward(self, grad_output):
    grads = honest_backward(self, grad_output)
    return grads._replace(hidden=perturbed(grads.hidden, 0))


sessions._run_chunk = lying
batching.run_rows = lying_rows
span_module.Graph.backward = lying_backward
from mesh.cli.main import app  # noqa: E402

app(prog_name="mesh")
