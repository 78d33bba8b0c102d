"""The protocol's messages as dataclasses; `to_wire`/`from_wire` turn them into msgpack-able dicts.

Each frame is `{"type": <name>, "v": <protocol version>, **fields}`; tensor fields are encoded by
`net/codec.py` with the compression the sender chose. `from_wire` checks the type, the major version and
that every required field is present, raising BadRequest / UnknownVersion for the handler to reply with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..model.errors import BadRequest
from .codec import decode_tensor, encode_tensor
from .wire import PROTOCOL_VERSION, UnknownVersion

__all__ = ["Message", "NextHop", "Ping", "Pong", "Probe", "ProbeReply", "SnapshotRequest", "Snapshot",
           "InfoRequest", "InfoReply", "OpenSession", "SessionOpened", "Step", "StepResult", "HistoryRequest",
           "History", "Relink", "CloseSession", "ForwardRequest", "ForwardReply", "BackwardRequest",
           "BackwardReply"]

MAX_TENSOR_NUMEL = 64 * 1024 * 1024
_TYPES: dict[str, type["Message"]] = {}


@dataclass
class Message:
    """A protocol message: a dataclass that turns into a typed, versioned frame and back."""

    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.TYPE = cls.__name__
        _TYPES[cls.TYPE] = cls

    def to_wire(self, compression: str = "none") -> dict:
        out: dict[str, Any] = {"type": self.TYPE, "v": PROTOCOL_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = encode_tensor(value, compression)
            elif isinstance(value, NextHop):
                value = value.to_wire()
            out[f.name] = value
        return out

    @classmethod
    def from_wire(cls, frame: Any, *, max_numel: int = MAX_TENSOR_NUMEL) -> "Message":
        """Parse a frame into the message class it names; `cls` restricts which types are accepted."""
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise BadRequest("frame is not a message")
        version = frame.get("v")
        if not isinstance(version, str) or version.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
            raise UnknownVersion(f"protocol version {version!r} is not supported",
                                 hint=f"this node speaks {PROTOCOL_VERSION}")
        kind = _TYPES.get(frame["type"])
        if kind is None or not issubclass(kind, cls):
            raise BadRequest(f"unexpected message {frame['type']!r}")
        values = {}
        for f in dataclasses.fields(kind):
            if f.name not in frame:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise BadRequest(f"{kind.TYPE} lacks field {f.name!r}")
                continue
            value = frame[f.name]
            if f.name in kind.TENSORS and value is not None:
                value = decode_tensor(value, max_numel=max_numel, name=f"{kind.TYPE}.{f.name}")
            elif f.name in kind.NEXT_HOPS and value is not None:
                value = NextHop.from_wire(value, name=f"{kind.TYPE}.{f.name}")
            values[f.name] = value
        msg = kind(**values)
        msg.validate()
        return msg

    TENSORS: ClassVar[tuple[str, ...]] = ()
    NEXT_HOPS: ClassVar[tuple[str, ...]] = ()  # fields holding a NextHop

    def validate(self) -> None:
        """Type checks of scalar fields; subclasses with ranges add their own."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _SCALARS.get(str(f.type))
            if expected is not None and not isinstance(value, expected) or isinstance(value, bool) and \
                    str(f.type) == "int":
                raise BadRequest(f"{self.TYPE}.{f.name} must be {f.type}")


MAX_ID = 128  # characters of a peer or session id
MAX_ADDRS, MAX_ADDR = 16, 512


@dataclass(frozen=True)
class NextHop:
    """Where a server pushes a session's outputs: the next server's peer id, its addresses, its session."""

    peer_id: str
    addrs: tuple[str, ...]
    session_id: str

    def to_wire(self) -> dict:
        return {"peer_id": self.peer_id, "addrs": list(self.addrs), "session_id": self.session_id}

    @classmethod
    def from_wire(cls, d: object, name: str = "next") -> "NextHop":
        """Checked field by field: a peer names the next hop, and nothing it sends is trusted."""
        if not isinstance(d, dict):
            raise BadRequest(f"{name} must be {{peer_id, addrs, session_id}}")
        peer_id, addrs, session_id = d.get("peer_id"), d.get("addrs", []), d.get("session_id")
        for field_name, value in (("peer_id", peer_id), ("session_id", session_id)):
            if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
                raise BadRequest(f"{name}.{field_name} must be a string of 1..{MAX_ID} characters")
        if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS or not all(
                isinstance(a, str) and len(a) <= MAX_ADDR for a in addrs):
            raise BadRequest(f"{name}.addrs must be a list of at most {MAX_ADDRS} addresses")
        return cls(peer_id, tuple(addrs), session_id)


_SCALARS = {"int": int, "str": str, "float": (int, float), "bool": bool, "dict": dict, "list": list}


# Control ---------------------------------------------------------------------------------------------


@dataclass
class Ping(Message):
    """A round-trip probe (one stream carries many)."""

    nonce: int


@dataclass
class Pong(Message):
    """The answer to a Ping, same nonce."""

    nonce: int


@dataclass
class Probe(Message):
    """Link-rate probe: `payload` up, then `reply_bytes` back."""
    payload: bytes
    reply_bytes: int


@dataclass
class ProbeReply(Message):
    """The bytes a link probe asked for."""

    payload: bytes


@dataclass
class SnapshotRequest(Message):
    """Ask a peer for its swarm table (a newcomer's first view)."""

    model_id: str = ""  # empty: every model the peer knows


@dataclass
class Snapshot(Message):
    """A peer's swarm table: announcements and how long ago each was heard."""

    servers: list = field(default_factory=list)  # ServerInfo wire dicts
    ages: list = field(default_factory=list)  # seconds since the sender last heard each one


@dataclass
class InfoRequest(Message):
    """Ask a server about itself."""

    pass


@dataclass
class InfoReply(Message):
    """A server's announcement, counters, and the cache length of each open session."""

    info: dict
    counters: dict = field(default_factory=dict)
    session_lengths: list = field(default_factory=list)  # tokens in each open session's cache, ascending


# Inference sessions -------------------------------------------------------------------------------


@dataclass
class OpenSession(Message):
    """Open an inference session on a server's blocks [start, end)."""

    session_id: str
    start: int
    end: int
    max_length: int
    batch_size: int = 1
    compression: str = "none"
    next: NextHop | None = None  # the next server's session, for pushes
    lora: dict | None = None  # LoraRef.to_wire(): adapters applied to every step of the session
    NEXT_HOPS: ClassVar[tuple[str, ...]] = ("next",)


@dataclass
class SessionOpened(Message):
    """The server took the session (its cache is reserved)."""

    session_id: str
    max_length: int


@dataclass
class Step(Message):
    """New tokens' hidden states for a session, at the position the caches should hold."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden", "position_ids", "attention_mask", "prompts")
    step_id: int
    position: int  # the cache length this step expects
    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    session_id: str = ""  # set on pushes: which session of the receiving server
    want_output: bool = True  # False for replays: the answer is an acknowledgement without hidden states


@dataclass
class StepResult(Message):
    """The last server's output for a step."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden",)
    step_id: int
    position: int
    hidden: torch.Tensor


@dataclass
class HistoryRequest(Message):
    """Ask for the outputs a server kept for positions [0, before)."""

    before: int  # positions [0, before) of what this session pushed


@dataclass
class History(Message):
    """A session's outputs for positions [0, before): the next hop's inputs, to rebuild a replacement."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden", "position_ids", "attention_mask")
    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class Relink(Message):
    """Change where a session pushes its outputs (failover)."""

    next: NextHop | None = None
    NEXT_HOPS: ClassVar[tuple[str, ...]] = ("next",)


@dataclass
class CloseSession(Message):
    """The client is done: free the session's cache."""

    pass


# Training passes -----------------------------------------------------------------------------------


@dataclass
class ForwardRequest(Message):
    """A training forward pass over blocks [start, end) (no session, no cache)."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden", "position_ids", "attention_mask", "prompts")
    start: int
    end: int
    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    compression: str = "none"
    lora: dict | None = None  # LoraRef.to_wire(): adapters for blocks [start, end), by key, weights optional
    keep: str = ""  # non-empty: keep the autograd graph for a BackwardRequest with the same `keep`


@dataclass
class ForwardReply(Message):
    """A training forward pass's output."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden",)
    hidden: torch.Tensor


@dataclass
class BackwardRequest(Message):
    """A training backward pass: the forward's input and the output's gradient."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden", "grad_output", "position_ids", "attention_mask", "prompts")
    start: int
    end: int
    hidden: torch.Tensor
    grad_output: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    compression: str = "none"
    lora: dict | None = None
    keep: str = ""  # the ForwardRequest's `keep`: reuse its graph instead of recomputing the forward


@dataclass
class BackwardReply(Message):
    """Gradients of a backward pass: the input's, the prompts', the LoRA tensors'."""

    TENSORS: ClassVar[tuple[str, ...]] = ("grad_input", "grad_prompts")
    grad_input: torch.Tensor
    grad_prompts: torch.Tensor | None = None
    grad_lora: list | None = None  # encoded tensors, in LoraWeights.tensors() order
