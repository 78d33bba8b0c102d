"""LoRA adapters on the wire and in a server's memory.

A request names a client's adapter by its content: `sha256:` and the digest of its spec, its blocks and
its weights. Two clients can never overwrite each other's adapter (different weights, different keys),
and a server checks the digest of the weights it receives against the key they came with. Weights travel
only the first time a server sees a key; servers keep the last `CACHE_SIZE` such adapters, at most
`Quotas.adapters_per_peer` of any one peer, and answer `adapter_unknown` to a key they do not hold sent
without weights, upon which the client sends them again. Adapters a server hosts (`mesh serve --adapter
DIR`) are named by their folder and never evicted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from ..model.errors import BadRequest
from ..model.lora import LoraSpec, LoraWeights
from .codec import decode_tensor, encode_tensor
from .wire import AdapterUnknown

__all__ = ["LoraRef", "AdapterCache", "content_key", "ClientLora", "CACHE_SIZE"]

CACHE_SIZE = 16
MAX_KEY = 200
HASHED = "sha256:"
Shapes = Callable[[LoraSpec], list[tuple[int, int]]]  # (in, out) features of each target of one block


def content_key(spec: LoraSpec, start: int, end: int, tensors: list[torch.Tensor]) -> str:
    """The name of an adapter's weights for blocks [start, end): a digest of all that defines them."""
    digest = hashlib.sha256(repr((spec.to_dict(), start, end, [list(t.shape) for t in tensors])).encode())
    for t in tensors:
        digest.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return HASHED + digest.hexdigest()


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
    def from_wire(cls, d: object, max_numel: int, max_rank: int) -> "LoraRef":
        if not isinstance(d, dict) or not isinstance(d.get("key"), str) or not 0 < len(d["key"]) <= MAX_KEY:
            raise BadRequest("lora: expected {key, spec, tensors}")
        spec = LoraSpec.from_dict(d["spec"], max_rank) if d.get("spec") is not None else None
        raw = d.get("tensors")
        if raw is not None and (not isinstance(raw, list) or spec is None or len(raw) > 4096):
            raise BadRequest("lora.tensors: expected a list, with a spec")
        tensors = None
        if raw is not None:
            tensors = [decode_tensor(t, max_numel=max_numel, name="lora.tensors", expect_dtype=torch.float32)
                       for t in raw]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise BadRequest("lora.tensors: NaN or Inf values")
        return cls(d["key"], spec, tensors)


class AdapterCache:
    """A server's adapters: hosted ones by name, and clients' recent ones by content key (bounded per peer
    and in all)."""

    def __init__(self, hosted: dict[str, LoraWeights] | None = None, capacity: int = CACHE_SIZE,
                 per_peer: int = 4, max_rank: int = 64, shapes: Shapes | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)  # the span's: weights move there once, not on every step
        self.hosted = {name: weights.to(self.device) for name, weights in (hosted or {}).items()}
        self.capacity, self.per_peer, self.max_rank = capacity, per_peer, max_rank
        self.shapes = shapes  # None: shapes are left to the span (tests without a model config)
        self._recent: OrderedDict[str, tuple[str, LoraWeights]] = OrderedDict()  # key -> (sender, weights)

    def resolve(self, wire_ref: dict | None, start: int, end: int, max_numel: int, peer: str = "") -> LoraWeights | None:
        """The adapter a request from `peer` names for blocks [start, end), storing weights it carries."""
        if wire_ref is None:
            return None
        ref = LoraRef.from_wire(wire_ref, max_numel, self.max_rank)
        if ref.key in self.hosted:
            return self.hosted[ref.key].sub(start, end)
        if ref.tensors is not None:
            return self._store(ref, start, end, peer)
        held = self._recent.get(ref.key)
        if held is None or (held[1].start, held[1].end) != (start, end):
            raise AdapterUnknown(f"adapter {ref.key[:40]!r} for blocks {start}:{end} is not here",
                                 hint="send its weights")
        self._recent.move_to_end(ref.key)
        return held[1]

    def _store(self, ref: LoraRef, start: int, end: int, peer: str) -> LoraWeights:
        assert ref.spec is not None and ref.tensors is not None
        self._check_shapes(ref.spec, start, end, ref.tensors)
        if content_key(ref.spec, start, end, ref.tensors) != ref.key:
            raise BadRequest("lora.key: not the sha256 of the weights sent with it",
                             hint="name an adapter by content_key() of its spec, blocks and weights")
        lora = LoraWeights.from_tensors(ref.spec, start, end, [t.to(self.device) for t in ref.tensors])
        self._recent[ref.key] = (peer, lora)
        self._recent.move_to_end(ref.key)
        mine = [k for k, (owner, _) in self._recent.items() if owner == peer]
        for key in mine[:max(0, len(mine) - self.per_peer)]:
            del self._recent[key]
        while len(self._recent) > self.capacity:
            self._recent.popitem(last=False)
        return lora

    def _check_shapes(self, spec: LoraSpec, start: int, end: int, tensors: list[torch.Tensor]) -> None:
        if self.shapes is None:
            return
        per_block = [s for fan_in, fan_out in self.shapes(spec) for s in ((spec.rank, fan_in), (fan_out, spec.rank))]
        want = per_block * (end - start)
        got = [tuple(t.shape) for t in tensors]
        if got != want:
            raise BadRequest(f"lora.tensors: shapes do not fit rank {spec.rank} on blocks {start}:{end} of this "
                             f"model ({len(got)} tensors, {len(want)} expected)")


def _digest(weights: LoraWeights) -> str:
    return content_key(weights.spec, weights.start, weights.end, weights.tensors())


@dataclass
class ClientLora:
    """A client's adapter: its weights for every block, or None for an adapter the servers host under the
    name `name`. Remembers where its weights were sent (until they change)."""

    name: str = ""
    weights: LoraWeights | None = None

    def __post_init__(self) -> None:
        self.sent: set[tuple[str, int, int]] = set()
        self._keys: dict[tuple[int, int], str] = {}
        self._digest = _digest(self.weights) if self.weights is not None else ""

    @classmethod
    def carrying(cls, weights: LoraWeights) -> "ClientLora":
        """An adapter whose weights travel to the servers, named by their content."""
        return cls("", weights)

    def update(self, weights: LoraWeights) -> None:
        """Weights after a training step (an optimizer may have changed them in place): if they differ from
        what was last named and sent, servers must get them again."""
        digest = _digest(weights)
        if digest == self._digest:
            return
        self.weights, self._digest = weights, digest
        self.sent.clear()
        self._keys.clear()

    def key(self, start: int, end: int) -> str:
        """How requests for blocks [start, end) name this adapter."""
        if self.weights is None:
            return self.name
        if (start, end) not in self._keys:
            sub = self.weights.sub(start, end)
            self._keys[start, end] = content_key(sub.spec, start, end, [t.detach() for t in sub.tensors()])
        return self._keys[start, end]

    def ref(self, start: int, end: int, with_weights: bool) -> dict:
        if self.weights is None:
            return LoraRef(self.name, None, None).to_wire()
        sub = self.weights.sub(start, end)
        tensors = [t.detach().to(torch.float32) for t in sub.tensors()] if with_weights else None
        return LoraRef(self.key(start, end), sub.spec, tensors).to_wire()
