"""Trainable adapters held by the client, and the differentiable pass through frozen blocks.

Methods (every trainable parameter lives here, in the client):
- `prompt`: P virtual tokens prepended to the input embeddings;
- `deep-prompt`: those, plus P trainable vectors per block added to the first P positions before it;
- `lora`: low-rank adapters on chosen projections of every block (`model/lora.py`).

`BlockRunner`s run blocks [0, n) with autograd: `LocalRunner` on a full local model (the reference),
`SwarmRunner` through the swarm (micro-batches in parallel, retries and rerouting in `net/training.py`).
Both take the same inputs, so a training step is the same code either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import trio
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from ..model.errors import BadRequest
from ..model.head import ClientHead, prepend_prefix, token_positions
from ..model.lora import LoraSpec, LoraWeights, init_lora, load_peft, save_peft
from ..model.span import Span

__all__ = ["TuningConfig", "Adapter", "BlockRunner", "adapted_logits", "lm_loss", "LocalRunner", "SwarmRunner"]

METHODS = ("prompt", "deep-prompt", "lora")
ADAPTER_FILE = "mesh_adapter.json"
PROMPTS_FILE = "prompts.safetensors"


@dataclass(frozen=True)
class TuningConfig:
    """Which adapter to train (prompt, deep prompt or LoRA) and its size."""

    method: str = "lora"
    num_prompts: int = 16
    lora: LoraSpec = field(default_factory=LoraSpec)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BadRequest(f"unknown method {self.method!r}", hint=f"one of {', '.join(METHODS)}")
        if self.method != "lora" and self.num_prompts < 1:
            raise BadRequest("--num-prompts must be at least 1")


class Adapter(nn.Module):
    """The trainable parameters of one method, for a model of `num_blocks` blocks."""

    def __init__(self, config: PretrainedConfig, tuning: TuningConfig, init_embeddings: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.tuning = tuning
        self.model_config = config
        self.num_blocks = config.num_hidden_layers
        h, p = config.hidden_size, tuning.num_prompts
        self.prompt = self.deep = None
        if tuning.method in ("prompt", "deep-prompt"):
            # Start from the embeddings of random vocabulary tokens: the blocks know what those look like.
            start = (init_embeddings.detach().clone() if init_embeddings is not None
                     else 0.02 * torch.randn(p, h, generator=generator))
            self.prompt = nn.Parameter(start.to(torch.float32))
        if tuning.method == "deep-prompt":
            self.deep = nn.Parameter(torch.zeros(self.num_blocks, p, h))
        self.lora = None
        if tuning.method == "lora":
            w = init_lora(config, tuning.lora, 0, self.num_blocks, generator)
            self.lora = nn.ParameterList([nn.Parameter(t) for t in w.tensors()])

    @property
    def num_prompts(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]

    def lora_weights(self) -> LoraWeights | None:
        if self.lora is None:
            return None
        return LoraWeights.from_tensors(self.tuning.lora, 0, self.num_blocks, list(self.lora))

    def deep_prompts(self) -> torch.Tensor | None:
        """[num_blocks, 1, P, H], the layout spans take (one batch row, broadcast)."""
        return None if self.deep is None else self.deep[:, None]

    def save(self, folder: Path, model_name: str = "") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"method": self.tuning.method, "num_prompts": self.tuning.num_prompts, "model": model_name,
                "num_blocks": self.num_blocks, "hidden_size": self.model_config.hidden_size}
        if self.lora is not None:
            save_peft(folder, self.lora_weights(), self.model_config, model_name)
            meta["lora"] = self.tuning.lora.to_dict()
        else:
            tensors = {"prompt": self.prompt.detach().contiguous()}
            if self.deep is not None:
                tensors["deep"] = self.deep.detach().contiguous()
            save_file(tensors, str(folder / PROMPTS_FILE))
        (folder / ADAPTER_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path, config: PretrainedConfig) -> "Adapter":
        try:
            meta = json.loads((Path(folder) / ADAPTER_FILE).read_text())
        except (OSError, ValueError) as e:
            raise BadRequest(f"{folder} is not a mesh adapter ({ADAPTER_FILE}: {e})") from None
        if meta.get("num_blocks") != config.num_hidden_layers or meta.get("hidden_size") != config.hidden_size:
            raise BadRequest(f"adapter {folder} was trained for another model ({meta.get('model') or '?'})")
        lora = LoraSpec.from_dict(meta["lora"]) if "lora" in meta else LoraSpec()
        adapter = cls(config, TuningConfig(meta["method"], int(meta["num_prompts"]), lora))
        with torch.no_grad():
            if adapter.lora is not None:
                for p, t in zip(adapter.lora, load_peft(Path(folder), config).tensors()):
                    p.copy_(t)
            else:
                tensors = load_file(str(Path(folder) / PROMPTS_FILE))
                adapter.prompt.copy_(tensors["prompt"])
                if adapter.deep is not None:
                    adapter.deep.copy_(tensors["deep"])
        return adapter


class BlockRunner(Protocol):
    """Runs the frozen blocks with an adapter: locally or through the swarm."""

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                 adapter: Adapter) -> torch.Tensor: ...


def adapted_logits(head: ClientHead, run: BlockRunner, adapter: Adapter, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits for `input_ids` [B, T] (right-padded) with the adapter applied: [B, T, vocab]."""
    hidden = head.embed(input_ids).to(torch.float32)
    mask = attention_mask.to(torch.long)
    p = adapter.num_prompts
    position_ids = token_positions(mask, p)
    if p:
        hidden, mask, position_ids = prepend_prefix(hidden, mask, position_ids, adapter.prompt)
    out = run(hidden, position_ids, mask, adapter)
    return head.logits(out[:, p:])


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labels != -100, and how many tokens counted."""
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    count = int((shift_labels != -100).sum())
    loss = nn.functional.cross_entropy(shift_logits.to(torch.float32), shift_labels, ignore_index=-100,
                                       reduction="sum")
    return loss / max(count, 1), count


class LocalRunner:
    """Blocks of a full local model, with ordinary autograd (the reference for the swarm)."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def __call__(self, hidden, position_ids, attention_mask, adapter):
        return self.span(hidden, position_ids, None, attention_mask, adapter.deep_prompts(), adapter.lora_weights())


class SwarmRunner:
    """Blocks through the swarm. Batches are cut into micro-batches of at most `micro_batch` rows, run
    concurrently (each on its own chain); their gradients are summed, so the result equals one pass."""

    def __init__(self, model, micro_batch: int = 4, spread: bool = True) -> None:
        from ..net.latency import RttTracker
        from ..net.chain import ChainConfig
        from ..net.training import SwarmBlocks

        self.model = model
        self.micro_batch = micro_batch
        client = model.client
        cfg = ChainConfig(client.node, client.swarm.table, RttTracker(client.node), model.source.model_id,
                          model.num_blocks, bans=model.bans, route_wait=model.route_wait, accept=model.accept,
                          checker=model.new_checker())
        self.blocks = SwarmBlocks(cfg, spread=spread, keep_graphs=True)
        self._lora = None

    @property
    def retries(self) -> int:
        return self.blocks.retries

    def _client_lora(self, adapter: Adapter):
        from ..net.adapters import ClientLora

        weights = adapter.lora_weights()
        if weights is None:
            return None
        if self._lora is None:
            self._lora = ClientLora.carrying(weights)
        else:
            self._lora.update(weights)  # new weights: servers get them again
        return self._lora

    def __call__(self, hidden, position_ids, attention_mask, adapter):
        self.blocks.keep_graphs = torch.is_grad_enabled()  # an eval pass has no backward to keep for
        deep = adapter.deep_prompts()
        flat = list(adapter.lora) if adapter.lora is not None else []
        return _SwarmBlocksFn.apply(self, adapter, position_ids, attention_mask, hidden,
                                    deep if deep is not None else torch.empty(0), *flat)

    def _each_micro_batch(self, batch: int, call) -> list:
        """`call(i, rows)` for each micro-batch, concurrently in the client's trio thread; results in order."""
        cuts = [slice(a, a + self.micro_batch) for a in range(0, batch, self.micro_batch)]
        results: list = [None] * len(cuts)

        async def one(i: int) -> None:
            results[i] = await call(i, cuts[i])

        async def run() -> None:
            async with trio.open_nursery() as n:
                for i in range(len(cuts)):
                    n.start_soon(one, i)

        self.model.client.call(run)
        return results

    def forward(self, hidden, position_ids, attention_mask, adapter):
        lora = self._client_lora(adapter)
        deep = adapter.deep_prompts()
        deep = deep.detach() if deep is not None else None
        results = self._each_micro_batch(hidden.shape[0], lambda i, rows: self.blocks.forward(
            hidden[rows].detach(), position_ids[rows], attention_mask[rows], prompts=deep, lora=lora))
        return torch.cat([r[0] for r in results]), [r[1] for r in results]

    def backward(self, grad_output, passes, adapter):
        results = self._each_micro_batch(grad_output.shape[0], lambda i, rows: self.blocks.backward(
            grad_output[rows].contiguous(), passes[i]))
        grad_hidden = torch.cat([r.hidden for r in results])
        grad_deep = None
        if adapter.deep is not None:
            grad_deep = sum(r.prompts for r in results)
        grad_lora = []
        if adapter.lora is not None:
            per_block = 2 * len(adapter.tuning.lora.targets)
            for b in range(adapter.num_blocks):
                parts = [r.lora[b] for r in results]
                grad_lora += [sum(ts) for ts in zip(*parts)]
            assert len(grad_lora) == per_block * adapter.num_blocks
        return grad_hidden, grad_deep, grad_lora


class _SwarmBlocksFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner, adapter, position_ids, attention_mask, hidden, deep, *lora):
        out, passes = runner.forward(hidden, position_ids, attention_mask, adapter)
        ctx.runner, ctx.adapter, ctx.passes = runner, adapter, passes
        return out

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_deep, grad_lora = ctx.runner.backward(grad_output, ctx.passes, ctx.adapter)
        if grad_deep is not None:
            grad_deep = grad_deep.reshape(ctx.adapter.deep_prompts().shape)
        else:
            grad_deep = None
        return (None, None, None, None, grad_hidden, grad_deep, *grad_lora)
