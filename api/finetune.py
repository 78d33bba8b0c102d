"""`mesh finetune`: train an adapter (prompts or LoRA) through the swarm's frozen blocks, or locally.

The run is a function of (data, seed, options): rows are checked first, each epoch's order comes from
(seed, epoch), and a checkpoint holds the adapter, the optimizer state and the position in the data, so a
resumed run ends with the same parameters as one that was never interrupted. Checkpoints are written to a
temporary folder and renamed into place, so a kill at any moment leaves the previous one intact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import PretrainedConfig

from ..model.data import Dataset, collate, epoch_order, load_jsonl
from ..model.device import Device
from ..model.errors import BadRequest
from ..model.head import load_tokenizer
from ..model.sources import resolve_model
from ..model.lora import DEFAULT_TARGETS, LoraSpec, default_targets
from .tuning import Adapter, LocalRunner, SwarmRunner, TuningConfig, adapted_logits, lm_loss

__all__ = ["FinetuneConfig", "Progress", "Result", "Backend", "evaluate", "run_finetune"]

log = logging.getLogger("mesh.finetune")

CHECKPOINT = "checkpoint"
STATE = "state.json"
OPTIMIZER = "optimizer.pt"


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on (its result is a function of these)."""

    data: Path
    model: str = "smollm2"
    method: str = "lora"
    epochs: int = 1
    lr: float | None = None  # None: a default per method
    batch_size: int = 4
    micro_batch: int = 4
    max_length: int = 256
    eval: Path | None = None
    out: Path = Path("adapter")
    resume: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    max_steps: int | None = None
    num_prompts: int = 16
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: Sequence[str] = ()  # empty: the family's default (lora.default_targets)
    skip_bad: bool = False
    local: bool = False
    initial_peers: list[str] = field(default_factory=list)
    device: str = "auto"  # the client's head (and with `local`, every block): auto, cpu, cuda[:N], mps
    dtype: str | None = None  # None: the device's default
    swarm_key: Path | None = None  # a private swarm's key file (None: $MESH_SWARM_KEY, else the open swarm)
    verify: float | None = None  # fraction of passes spot-checked (None: 0.02 on the open swarm, 0 if private)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else {"lora": 2e-3}.get(self.method, 1e-1)

    def tuning(self, config: PretrainedConfig | None = None) -> TuningConfig:
        """The adapter to train; without `lora_targets`, the projections the family of `config` adapts by
        default (q_proj and v_proj until the config is known)."""
        targets = tuple(self.lora_targets) or (default_targets(config) if config is not None else DEFAULT_TARGETS)
        return TuningConfig(self.method, self.num_prompts, LoraSpec(self.lora_rank, self.lora_alpha, targets))


@dataclass
class Progress:
    """One training step's report, for progress bars."""

    step: int
    total: int
    epoch: int
    loss: float
    tokens_per_s: float


@dataclass
class Result:
    """What a run did: steps, losses, where the adapter is, rows skipped, hops rerouted."""

    steps: int
    eval_losses: list[float]  # before training, then after each epoch (empty without --eval)
    train_losses: list[float]
    out: Path
    skipped: int
    retries: int = 0


class Backend:
    """The head, tokenizer and block runner of a run: local, or the swarm's."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self._model = None
        where = Device.choose(cfg.device, cfg.dtype)
        if cfg.local:
            from transformers import AutoModelForCausalLM

            from ..model.head import head_from_model, load_tokenizer
            from ..model.sources import resolve_model
            from ..model.span import span_from_model

            source = resolve_model(cfg.model)
            full = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=where.dtype).to(where.torch).eval()
            full.requires_grad_(False)
            self.config, self.head, self.tokenizer = full.config, head_from_model(full), load_tokenizer(source)
            self.runner = LocalRunner(span_from_model(full, 0, full.config.num_hidden_layers))
            self.name = source.model_id
        else:
            from . import DistributedModelForCausalLM

            self._model = DistributedModelForCausalLM.from_pretrained(cfg.model, cfg.initial_peers or None,
                                                                      device=where.torch, dtype=where.dtype,
                                                                      swarm_key=cfg.swarm_key, verify=cfg.verify)
            self.config, self.head, self.tokenizer = self._model.config, self._model.head, self._model.tokenizer
            self.runner = SwarmRunner(self._model, micro_batch=cfg.micro_batch)
            self.name = self._model.source.model_id

    @property
    def retries(self) -> int:
        return getattr(self.runner, "retries", 0)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()


def _batches(data: Dataset, order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def evaluate(backend: Backend, adapter: Adapter, data: Dataset, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over `data`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for rows in _batches(data, list(range(len(data.examples))), batch_size):
            ids, mask, labels = collate([data.examples[i] for i in rows], pad_id)
            loss, n = lm_loss(adapted_logits(backend.head, backend.runner, adapter, ids, mask), labels)
            total += float(loss) * n
            count += n
    return total / max(count, 1)


def _save_checkpoint(out: Path, adapter: Adapter, optimizer: torch.optim.Optimizer, state: dict,
                     model_name: str) -> None:
    tmp = out / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    adapter.save(tmp, model_name)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    (tmp / STATE).write_text(json.dumps(state, indent=2))
    final, old = out / CHECKPOINT, out / f".{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _save_adapter(out: Path, adapter: Adapter, model_name: str) -> None:
    """The trained adapter in `out` itself, each file replaced atomically."""
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    adapter.save(tmp, model_name)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


@dataclass
class _Position:
    """Where a run stands: steps done, the next (epoch, batch), and the losses so far."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    eval_losses: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)


def _check(cfg: FinetuneConfig) -> tuple[int, Dataset, Dataset | None]:
    """Options and every row checked before anything joins the swarm or loads a block: (pad id, train, eval)."""
    if cfg.batch_size < 1 or cfg.micro_batch < 1 or cfg.epochs < 1:
        raise BadRequest("--batch-size, --micro-batch and --epochs must be at least 1")
    if cfg.resume and not (cfg.out / CHECKPOINT / STATE).exists():
        raise BadRequest(f"--resume: no checkpoint in {cfg.out}", hint="run without --resume to start")
    tok = load_tokenizer(resolve_model(cfg.model))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train = load_jsonl(cfg.data, tok, cfg.max_length, cfg.skip_bad)
    evals = load_jsonl(cfg.eval, tok, cfg.max_length, cfg.skip_bad) if cfg.eval else None
    if train.skipped:
        log.warning("skipped %d bad rows of %s", len(train.skipped), cfg.data)
    return pad_id, train, evals


def _start(cfg: FinetuneConfig, backend: Backend) -> tuple[Adapter, torch.optim.Optimizer, _Position]:
    """A new adapter (initialised from the seed) and optimizer, or the checkpoint's with --resume."""
    tuning = cfg.tuning(backend.config)
    g = torch.Generator().manual_seed(cfg.seed)
    init = None
    if tuning.method != "lora":
        ids = torch.randint(0, backend.head.embedding_layer().num_embeddings, (tuning.num_prompts,), generator=g)
        init = backend.head.embed(ids).detach()
    adapter = Adapter(backend.config, tuning, init, g)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    if not cfg.resume:
        return adapter, optimizer, _Position()
    state = json.loads((cfg.out / CHECKPOINT / STATE).read_text())
    if state["method"] != tuning.method or state["seed"] != cfg.seed:
        raise BadRequest(f"--resume: the checkpoint is of --method {state['method']} --seed {state['seed']}")
    loaded = Adapter.load(cfg.out / CHECKPOINT, backend.config)
    with torch.no_grad():
        for p, q in zip(adapter.parameters(), loaded.parameters()):
            p.copy_(q)
    optimizer.load_state_dict(torch.load(cfg.out / CHECKPOINT / OPTIMIZER))
    at = _Position(state["step"], state["epoch"], state["batch"], state["eval_losses"], state["train_losses"])
    log.info("resuming at step %d (epoch %d, batch %d)", at.step, at.epoch, at.batch)
    return adapter, optimizer, at


def run_finetune(cfg: FinetuneConfig, on_progress: Callable[[Progress], None] = lambda p: None,
                 on_eval: Callable[[int, float], None] = lambda e, l: None) -> Result:
    """Train the adapter `cfg` asks for; checkpoints go to `cfg.out` every `checkpoint_every` steps."""
    cfg.tuning()  # its options are checked first
    pad_id, train, evals = _check(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    backend = Backend(cfg)
    try:
        adapter, optimizer, at = _start(cfg, backend)
        if not cfg.resume and evals is not None:
            at.eval_losses.append(evaluate(backend, adapter, evals, cfg.batch_size, pad_id))
            on_eval(0, at.eval_losses[-1])
        per_epoch = math.ceil(len(train.examples) / cfg.batch_size)
        total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)

        def checkpoint(epoch: int, batch: int) -> None:
            state = {"step": at.step, "epoch": epoch, "batch": batch, "method": cfg.method, "seed": cfg.seed,
                     "eval_losses": at.eval_losses, "train_losses": at.train_losses}
            _save_checkpoint(cfg.out, adapter, optimizer, state, backend.name)
            log.info("checkpoint saved at step %d", at.step)

        t0, tokens = time.perf_counter(), 0
        for epoch in range(at.epoch, cfg.epochs):
            batches = _batches(train, epoch_order(len(train.examples), cfg.seed, epoch), cfg.batch_size)
            for b in range(at.batch if epoch == at.epoch else 0, len(batches)):
                if at.step >= total:
                    break
                ids, mask, labels = collate([train.examples[i] for i in batches[b]], pad_id)
                loss, _ = lm_loss(adapted_logits(backend.head, backend.runner, adapter, ids, mask), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                at.step += 1
                tokens += int(mask.sum())
                at.train_losses.append(float(loss.detach()))
                log.info("step %d/%d: loss %.4f", at.step, total, at.train_losses[-1])
                on_progress(Progress(at.step, total, epoch, at.train_losses[-1], tokens / (time.perf_counter() - t0)))
                if cfg.checkpoint_every and at.step % cfg.checkpoint_every == 0:
                    checkpoint(epoch, b + 1)
            if evals is not None and at.step <= total:
                at.eval_losses.append(evaluate(backend, adapter, evals, cfg.batch_size, pad_id))
                on_eval(epoch + 1, at.eval_losses[-1])
            if at.step >= total:
                break
        checkpoint(cfg.epochs, 0)
        _save_adapter(cfg.out, adapter, backend.name)
        return Result(at.step, at.eval_losses, at.train_losses, cfg.out, len(train.skipped), backend.retries)
    finally:
        backend.close()
