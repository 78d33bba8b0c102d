"""The client-side parts of a model: embeddings, final norm, LM head, tokenizer and chat template.

Loaded without any transformer block: the model class is built with zero layers on the meta device and
only the head tensors are read from the checkpoint.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from . import compat
from .sources import ModelSource
from .weights import Checkpoint

__all__ = ["ClientHead", "token_positions", "prepend_prefix", "head_from_model", "load_head", "load_tokenizer"]

HOST = torch.device("cpu")  # where the client's sampler, loss and wire are


class ClientHead(nn.Module):
    """Token embeddings in, logits out; everything between runs on spans.

    Computes on the device its weights live on and hands results back on the host: embeddings go to the
    wire (or to local spans, which move them where they run) and logits to the sampler or the loss, both of
    which the client keeps on the host."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.family = compat.family_of(model.config)
        self.requires_grad_(False)
        self.eval()

    @property
    def base(self) -> nn.Module:
        return getattr(self.model, self.family.head.base)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        layout = self.family.head
        table = self.embedding_layer()
        x = F.embedding(input_ids.to(self.device), table.weight, table.padding_idx)
        if layout.scale_embeddings:  # in float32, then rounded to the weights' dtype, as the model does
            x = x * torch.tensor(self.config.hidden_size ** 0.5).to(x.dtype)
        if layout.embed_norm is not None:
            x = getattr(self.base, layout.embed_norm)(x)
        return x.to(HOST)

    def parts(self) -> list[nn.Module]:
        """The modules the head runs (the rest of its model class, rotary tables and all, stays unused)."""
        layout = self.family.head
        extra = [getattr(self.base, layout.embed_norm)] if layout.embed_norm is not None else []
        return [self.embedding_layer(), *extra, self.final_norm(), self.model.lm_head]

    def embedding_layer(self) -> nn.Embedding:
        return getattr(self.base, self.family.head.embed)

    def final_norm(self) -> nn.Module:
        return getattr(self.base, self.family.head.final_norm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.final_norm()(hidden.to(self.device, self.dtype)))
        cap = getattr(self.config, "final_logit_softcapping", None) if self.family.head.softcap_logits else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.to(HOST)


def token_positions(mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Each token's position: `offset` + its index among the attended tokens of its row (left or right
    padding alike); padding gets 1, which the mask hides anyway."""
    return (mask.cumsum(-1) - 1 + offset).masked_fill(mask == 0, 1)


def prepend_prefix(hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                   prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trained virtual tokens [P, H] before every row of `hidden` [B, T, H]: at positions 0..P-1, always
    attended (the tokens' own positions start at P, see `token_positions(mask, P)`)."""
    batch, p = hidden.shape[0], prefix.shape[0]
    return (torch.cat([prefix.to(hidden.dtype)[None].expand(batch, -1, -1), hidden], dim=1),
            torch.cat([torch.ones(batch, p, dtype=mask.dtype), mask], dim=1),
            torch.cat([torch.arange(p)[None].expand(batch, -1), positions], dim=1))


def head_from_model(model: nn.Module) -> ClientHead:
    """A head sharing the weights of an already loaded full model (tests, local runs)."""
    return ClientHead(model)


def load_head(source: ModelSource, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> ClientHead:
    """The client's part of a model (embeddings, final norm, LM head) on `device`, reading no block."""
    config = copy.deepcopy(source.config)
    family = compat.family_of(config)
    config.num_hidden_layers = 0
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = []
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ckpt = Checkpoint.open(source.path, source.fetch)
    block_prefixes = tuple(t.split("{i}")[0] for t in family.layer_prefixes)
    own = model.state_dict()
    names: dict[str, str] = {}  # checkpoint name -> the model's name, for head tensors only
    for name in ckpt.files:
        if name.startswith(block_prefixes):
            continue
        candidates = [name, *(f"{family.head.base}.{name[len(p):]}" for p in family.head_prefixes
                              if name.startswith(p))]
        if name.split(".")[-2:-1] == ["lm_head"]:  # a multimodal checkpoint's language_model.lm_head
            candidates.append("lm_head." + name.split(".")[-1])
        found = next((c for c in candidates if c in own), None)
        if found is not None:
            names[name] = found
    tensors = ckpt.read(list(names), dtype)  # no other tensor (a vision tower) is read
    state = {names[n]: t for n, t in tensors.items()}
    missing = [k for k in own if k not in state]
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    if "lm_head.weight" in missing and tied:
        missing.remove("lm_head.weight")
    if missing:
        raise ValueError(f"checkpoint lacks head tensors: {missing[:4]}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied or "lm_head.weight" not in state:
        model.lm_head.weight = model.get_input_embeddings().weight
    model.to(dtype)
    head = ClientHead(model)
    for part in head.parts():  # only these: unused buffers of the model class are still on the meta device
        for module in part.modules():  # buffers the head never reads (a scale it applies itself) stay unset
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf.is_meta:
                    module.register_buffer(name, None, persistent=False)
        part.to(device)
    return head


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's tokenizer, padding on the left (generation) with EOS when it has no pad token."""
    tok = AutoTokenizer.from_pretrained(str(source.path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
