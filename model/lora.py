"""LoRA adapters on a span's projections, held as plain tensors so they can travel with a request.

`y = W x + (alpha / rank) · B (A x)` on each target projection of each block (A: [rank, in], B: [out,
rank]), as peft computes it without dropout. `applied(span_layers, lora)` attaches the deltas as forward
hooks for the duration of one computation (servers run one computation at a time per span), so the
frozen weights stay shared by every session. `save_peft` / `load_peft` use peft's adapter format, so an
adapter trained through the swarm also loads with peft on a full local model.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from . import compat
from .errors import BadRequest

__all__ = ["DEFAULT_TARGETS", "default_targets", "LoraSpec", "LoraWeights", "target_modules", "lora_shapes",
           "init_lora", "applied", "save_peft", "load_peft"]

DEFAULT_TARGETS = ("q_proj", "v_proj")  # Llama-like families; `default_targets` knows every family's
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter's shape: rank, alpha and the projections it targets."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: object, max_rank: int = 1 << 16) -> "LoraSpec":
        """A spec from a peer's or a file's map, every field checked."""
        if not isinstance(d, dict):
            raise BadRequest("lora.spec: expected a map")
        rank, alpha, targets = d.get("rank"), d.get("alpha"), d.get("targets")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
            raise BadRequest(f"lora.spec.rank: expected an integer in 1..{max_rank}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise BadRequest("lora.spec.alpha: expected a finite number")
        if not isinstance(targets, list) or not 0 < len(targets) <= 16 or not all(
                isinstance(t, str) and 0 < len(t) <= 64 for t in targets):
            raise BadRequest("lora.spec.targets: expected 1..16 projection names")
        return cls(rank, float(alpha), tuple(targets))


@dataclass
class LoraWeights:
    """Adapters of blocks [start, end): `a[i][j]`, `b[i][j]` for block start + i and target j."""

    spec: LoraSpec
    start: int
    end: int
    a: list[list[torch.Tensor]]
    b: list[list[torch.Tensor]]

    def sub(self, start: int, end: int) -> "LoraWeights":
        if not self.start <= start < end <= self.end:
            raise BadRequest(f"LoRA of blocks {self.start}:{self.end} has no blocks {start}:{end}")
        i, j = start - self.start, end - self.start
        return LoraWeights(self.spec, start, end, self.a[i:j], self.b[i:j])

    def to(self, device: torch.device | str) -> "LoraWeights":
        """The same adapters on `device`."""
        return LoraWeights(self.spec, self.start, self.end, [[t.to(device) for t in row] for row in self.a],
                           [[t.to(device) for t in row] for row in self.b])

    def tensors(self) -> list[torch.Tensor]:
        """Flat, in order: block, target, A then B (the wire order and the gradient order)."""
        return [t for ab, bb in zip(self.a, self.b) for pair in zip(ab, bb) for t in pair]

    @classmethod
    def from_tensors(cls, spec: LoraSpec, start: int, end: int, flat: Sequence[torch.Tensor]) -> "LoraWeights":
        per_block = 2 * len(spec.targets)
        if len(flat) != per_block * (end - start):
            raise BadRequest(f"LoRA for blocks {start}:{end} needs {per_block * (end - start)} tensors, "
                             f"got {len(flat)}")
        a = [[flat[k * per_block + 2 * j] for j in range(len(spec.targets))] for k in range(end - start)]
        b = [[flat[k * per_block + 2 * j + 1] for j in range(len(spec.targets))] for k in range(end - start)]
        return cls(spec, start, end, a, b)


def default_targets(config: PretrainedConfig) -> tuple[str, ...]:
    """The projections a LoRA adapter of this model targets unless told otherwise (its query and value)."""
    return compat.family_of(config).lora_targets


def target_modules(layer: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The projection named by each target (the module whose name is or ends with `.target`)."""
    out = []
    for t in targets:
        found = [(n, m) for n, m in layer.named_modules() if n == t or n.endswith("." + t)]
        if len(found) != 1 or not hasattr(found[0][1], "in_features"):
            raise BadRequest(f"LoRA target {t!r} names {len(found)} projections in a block",
                             hint="e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
        out.append(found[0])
    return out


def lora_shapes(config: PretrainedConfig, spec: LoraSpec) -> list[tuple[int, int]]:
    """(in, out) features of each projection `spec` targets in one block of this model."""
    return [(m.in_features, m.out_features) for _, m in target_modules(_meta_layer(config), spec.targets)]


def init_lora(config: PretrainedConfig, spec: LoraSpec, start: int, end: int,
              generator: torch.Generator | None = None, zero_b: bool = True) -> LoraWeights:
    """peft's initialisation: A Kaiming-uniform, B zeros (so training starts from the base model)."""
    shapes = lora_shapes(config, spec)
    a, b = [], []
    for _ in range(start, end):
        a.append([_kaiming(spec.rank, fan_in, generator) for fan_in, _ in shapes])
        b.append([torch.zeros(out, spec.rank) if zero_b else 0.02 * torch.randn(out, spec.rank, generator=generator)
                  for _, out in shapes])
    return LoraWeights(spec, start, end, a, b)


def _kaiming(rows: int, fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_ with a = sqrt(5), as nn.Linear and peft use
    return (torch.rand(rows, fan_in, generator=generator) * 2 - 1) * bound


def _meta_layer(config: PretrainedConfig) -> nn.Module:
    with torch.device("meta"):
        return compat.build_layer(compat.family_of(config), compat.ensure_attention(config), 0)


@contextmanager
def applied(layers: Sequence[nn.Module], lora: LoraWeights | None) -> Iterator[None]:
    """Add the LoRA deltas to the target projections of `layers` (blocks lora.start…) while inside."""
    if lora is None:
        yield
        return
    if len(layers) != lora.end - lora.start:
        raise BadRequest(f"LoRA covers {lora.end - lora.start} blocks, the span {len(layers)}")
    handles = []
    scale = lora.spec.scale
    try:
        for layer, a_row, b_row in zip(layers, lora.a, lora.b):
            for (_, module), a, b in zip(target_modules(layer, lora.spec.targets), a_row, b_row):
                if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
                    raise BadRequest(f"LoRA shapes {list(a.shape)}, {list(b.shape)} do not fit "
                                     f"{module.in_features}→{module.out_features}")

                def hook(mod, inputs, output, a=a, b=b):
                    x = inputs[0]
                    return output + scale * ((x @ a.to(x.device, x.dtype).T) @ b.to(x.device, x.dtype).T)

                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _peft_prefix(config: PretrainedConfig) -> str:
    return "base_model.model." + compat.family_of(config).layer_prefixes[0]


def save_peft(folder: Path, lora: LoraWeights, config: PretrainedConfig, base_model: str = "") -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` as peft does (all blocks required)."""
    if (lora.start, lora.end) != (0, config.num_hidden_layers):
        raise BadRequest("a saved adapter must cover every block")
    folder.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in target_modules(_meta_layer(config), lora.spec.targets)]
    prefix = _peft_prefix(config)
    tensors = {}
    for i, (a_row, b_row) in enumerate(zip(lora.a, lora.b)):
        for name, a, b in zip(names, a_row, b_row):
            base = prefix.format(i=i) + name
            tensors[f"{base}.lora_A.weight"] = a.detach().to(torch.float32).contiguous()
            tensors[f"{base}.lora_B.weight"] = b.detach().to(torch.float32).contiguous()
    save_file(tensors, str(folder / PEFT_WEIGHTS))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.spec.rank, "lora_alpha": lora.spec.alpha,
           "target_modules": list(lora.spec.targets), "lora_dropout": 0.0, "bias": "none",
           "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True,
           "use_rslora": False, "use_dora": False}
    (folder / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2))


def load_peft(folder: Path, config: PretrainedConfig) -> LoraWeights:
    """Read a peft LoRA adapter (every block must carry every target)."""
    try:
        cfg = json.loads((folder / PEFT_CONFIG).read_text())
        tensors = load_file(str(folder / PEFT_WEIGHTS))
    except (OSError, ValueError) as e:
        raise BadRequest(f"{folder} is not a LoRA adapter: {e}") from e
    if cfg.get("peft_type") != "LORA":
        raise BadRequest(f"{folder} holds a {cfg.get('peft_type')} adapter, not LoRA")
    targets = cfg["target_modules"]
    targets = tuple(sorted(targets)) if isinstance(targets, (list, set)) else (str(targets),)
    spec = LoraSpec(int(cfg["r"]), float(cfg["lora_alpha"]), targets)
    names = [n for n, _ in target_modules(_meta_layer(config), spec.targets)]
    prefix = _peft_prefix(config)
    a, b = [], []
    try:
        for i in range(config.num_hidden_layers):
            a.append([tensors[f"{prefix.format(i=i)}{n}.lora_A.weight"] for n in names])
            b.append([tensors[f"{prefix.format(i=i)}{n}.lora_B.weight"] for n in names])
    except KeyError as e:
        raise BadRequest(f"{folder}: missing tensor {e}") from None
    return LoraWeights(spec, 0, config.num_hidden_layers, a, b)
