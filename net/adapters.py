"""LoRA adapters on the wire and in a server's memory.

A request names its adapter by a key of the client's choosing (a training run changes the key whenever
the weights change). Weights travel only the first time a server sees a key for a range of blocks:
servers keep the last `CACHE_SIZE` such adapters, and answer `adapter_unknown` to a key they do not hold
sent without weights, upon which the client sends them again. Adapters a server hosts (`mesh serve
--adapter DIR`) are found by their name and never evicted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..model.errors import BadRequest
from ..model.lora import LoraSpec, LoraWeights
from .codec import decode_tensor, encode_tensor
from .wire import AdapterUnknown

__all__ = ["LoraRef", "AdapterCache", "weights_hash", "ClientLora"]

CACHE_SIZE = 16
MAX_KEY = 200


@dataclass
class LoraRef:
    """An adapter as a request names it: a key, and its weights the first time a server sees them."""

    key: str
    spec: LoraSpec | None  # None for an adapter hosted by the server, named by `key`
    tensors: list[torch.Tensor] | None  # None: the server should hold it already

    def to_wire(self) -> dict:
        return {"key": self.key, "spec": self.spec.to_dict() if self.spec else None,
                "tensors": [encode_tensor(t) for t in self.tensors] if self.tensors is not None else None}

    @classmethod
    def from_wire(cls, d: object, max_numel: int) -> "LoraRef":
        if not isinstance(d, dict) or not isinstance(d.get("key"), str) or not 0 < len(d["key"]) <= MAX_KEY:
            raise BadRequest("lora must be {key, spec, tensors}")
        spec = LoraSpec.from_dict(d["spec"]) if isinstance(d.get("spec"), dict) else None
        raw = d.get("tensors")
        if raw is not None and (not isinstance(raw, list) or spec is None):
            raise BadRequest("lora tensors must be a list, with a spec")
        tensors = [decode_tensor(t, max_numel=max_numel, name="lora") for t in raw] if raw is not None else None
        return cls(d["key"], spec, tensors)


class AdapterCache:
    """A server's adapters: hosted ones by name, and clients' recent ones by key (bounded)."""

    def __init__(self, hosted: dict[str, LoraWeights] | None = None, capacity: int = CACHE_SIZE) -> None:
        self.hosted = dict(hosted or {})
        self.capacity = capacity
        self._recent: OrderedDict[tuple[str, int, int], LoraWeights] = OrderedDict()

    def resolve(self, wire_ref: dict | None, start: int, end: int, max_numel: int) -> LoraWeights | None:
        """The adapter a request names for blocks [start, end), storing weights it carries."""
        if wire_ref is None:
            return None
        ref = LoraRef.from_wire(wire_ref, max_numel)
        if ref.key in self.hosted:
            return self.hosted[ref.key].sub(start, end)
        slot = (ref.key, start, end)
        if ref.tensors is not None:
            lora = LoraWeights.from_tensors(ref.spec, start, end, [t.to(torch.float32) for t in ref.tensors])
            self._recent[slot] = lora
            self._recent.move_to_end(slot)
            while len(self._recent) > self.capacity:
                self._recent.popitem(last=False)
            return lora
        lora = self._recent.get(slot)
        if lora is None:
            raise AdapterUnknown(f"adapter {ref.key[:40]!r} for blocks {start}:{end} is not here",
                                 hint="send its weights")
        self._recent.move_to_end(slot)
        return lora


def weights_hash(weights: LoraWeights) -> str:
    """A short digest of LoRA weights: new weights, new key, so servers never use stale ones."""
    digest = hashlib.sha1()
    for t in weights.tensors():
        digest.update(t.detach().to(torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class ClientLora:
    """A client's adapter: its weights for every block under `key` (change the key when they change), or
    None for an adapter the servers host under the name `key`. Remembers where its weights were sent."""

    key: str
    weights: LoraWeights | None = None

    def __post_init__(self) -> None:
        self.sent: set[tuple[str, int, int]] = set()

    def update(self, key: str, weights: LoraWeights) -> None:
        self.key, self.weights = key, weights
        self.sent.clear()

    @classmethod
    def keyed(cls, prefix: str, weights: LoraWeights) -> "ClientLora":
        """An adapter whose key is `prefix` + a hash of its weights: a change of weights changes the key."""
        return cls(f"{prefix}:{weights_hash(weights)}", weights)

    def ref(self, start: int, end: int, with_weights: bool) -> dict:
        if self.weights is None:
            return LoraRef(self.key, None, None).to_wire()
        sub = self.weights.sub(start, end)
        tensors = [t.detach().to(torch.float32) for t in sub.tensors()] if with_weights else None
        return LoraRef(self.key, sub.spec, tensors).to_wire()
