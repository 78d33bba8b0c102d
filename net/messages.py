"""The protocol's messages as dataclasses; `to_wire`/`from_wire` turn them into msgpack-able dicts.

Each frame is `{"type": <name>, "v": <protocol version>, **fields}`; tensor fields are encoded by
`net/codec.py` with the compression the sender chose. Every frame comes from a peer, so `from_wire` checks
all of it before a message exists: the type, the major version, every field's declared type, finite
numbers, the range or length its `limits()` declare, tensors' dtypes, shapes that agree, and no NaN/Inf.
A bad frame raises BadRequest naming the field (or UnknownVersion) for the handler to reply with.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..model.errors import BadRequest
from .codec import decode_tensor, encode_tensor
from .commitments import MAX_COMMITMENTS, Commitment, parse_commitments
from .wire import PROTOCOL_VERSION, UnknownVersion

__all__ = ["Message", "NextHop", "Ping", "Pong", "Probe", "ProbeReply", "SnapshotRequest", "Snapshot",
           "InfoRequest", "InfoReply", "OpenSession", "SessionOpened", "Step", "StepResult", "HistoryRequest",
           "History", "Relink", "Predecessor", "CloseSession", "ForwardRequest", "ForwardReply", "BackwardRequest",
           "BackwardReply", "limits", "check_inputs", "MAX_ID", "MAX_BLOCK", "MAX_PROBE"]

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
            elif isinstance(value, list) and value and isinstance(value[0], Commitment):
                value = [c.to_wire() for c in value]
            out[f.name] = value
        return out

    @classmethod
    def from_wire(cls, frame: Any, *, max_numel: int = MAX_TENSOR_NUMEL) -> "Message":
        """Parse a frame into the message class it names; `cls` restricts which types are accepted.
        Every field is checked (type, finite numbers, range, length) before the message exists."""
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise BadRequest("frame is not a message")
        version = frame.get("v")
        if not isinstance(version, str) or version.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
            raise UnknownVersion(f"protocol version {str(version)[:20]!r} is not supported",
                                 hint=f"this node speaks {PROTOCOL_VERSION}")
        kind = _TYPES.get(frame["type"])
        if kind is None or not issubclass(kind, cls):
            raise BadRequest(f"unexpected message {frame['type'][:40]!r}")
        values = {}
        for f in dataclasses.fields(kind):
            name = f"{kind.TYPE}.{f.name}"
            if f.name not in frame:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise BadRequest(f"{name}: missing")
                continue
            value = frame[f.name]
            if f.name in kind.TENSORS and value is not None:
                value = decode_tensor(value, max_numel=max_numel, name=name)
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise BadRequest(f"{name}: NaN or Inf values")
            elif f.name in kind.NEXT_HOPS and value is not None:
                value = NextHop.from_wire(value, name=name)
            _check_field(name, value, f)
            values[f.name] = value
        msg = kind(**values)
        msg.validate()
        return msg

    TENSORS: ClassVar[tuple[str, ...]] = ()
    NEXT_HOPS: ClassVar[tuple[str, ...]] = ()  # fields holding a NextHop

    def validate(self) -> None:
        """Checks across fields; subclasses that have them override this."""


MAX_INT = 2 ** 53  # integers past this lose precision in other peers' languages: nobody needs them here

_INDEX_DTYPES = (torch.int64, torch.int32)
_MASK_DTYPES = (torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)


def check_inputs(msg: "Message") -> None:
    """Dtypes and shapes of a pass's input tensors that hold whatever the model: hidden states (and
    gradients, prompts) are floating, positions integers, masks integers or booleans, and all of them agree
    on [batch, tokens]. The model's own sizes are checked by the span."""
    name = msg.TYPE
    hidden = getattr(msg, "hidden")
    if not hidden.is_floating_point() or hidden.dim() != 3:
        raise BadRequest(f"{name}.hidden: expected a floating [batch, tokens, hidden] tensor, "
                         f"got {str(hidden.dtype).removeprefix('torch.')} {list(hidden.shape)}")
    for field_name, dtypes in (("position_ids", _INDEX_DTYPES), ("attention_mask", _MASK_DTYPES)):
        t = getattr(msg, field_name)
        if t is None:
            continue
        if t.dtype not in dtypes or tuple(t.shape) != tuple(hidden.shape[:2]):
            raise BadRequest(f"{name}.{field_name}: expected an integer {list(hidden.shape[:2])} tensor, "
                             f"got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
    for field_name in ("prompts", "grad_output"):
        t = getattr(msg, field_name, None)
        if t is not None and not t.is_floating_point():
            raise BadRequest(f"{name}.{field_name}: expected a floating tensor")


# annotation -> accepted Python types and how an error names them (NextHop fields are parsed by NextHop)
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
    "bytes": ((bytes,), "bytes"), "bool": ((bool,), "a boolean"), "dict": ((dict,), "a map"),
    "list": ((list,), "a list"), "torch.Tensor": ((torch.Tensor,), "a tensor"),
}


def limits(lo: float | None = None, hi: float | None = None, *, length: int | None = None, **kw: Any) -> Any:
    """A dataclass field whose value is range- (numbers) or length- (strings, bytes, lists) checked on parse."""
    return field(metadata={"lo": lo, "hi": hi, "length": length}, **kw)


@functools.lru_cache(maxsize=None)
def _options(annotation: str) -> tuple[str, ...]:
    """`"torch.Tensor | None"` → ("torch.Tensor", "None"), once per annotation, not once per frame."""
    return tuple(t.strip() for t in annotation.split("|"))


def _check_field(name: str, value: Any, f: dataclasses.Field) -> None:
    """The field's declared type, finite if a number, within its declared range or length."""
    options = _options(str(f.type))
    if value is None:
        if "None" not in options:
            raise BadRequest(f"{name}: expected {_KINDS.get(options[0], ((), options[0]))[1]}, got nothing")
        return
    kinds = [_KINDS[o] for o in options if o != "None" and o in _KINDS]
    if kinds and not any(isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
                         for types, _ in kinds):
        raise BadRequest(f"{name}: expected {kinds[0][1]}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{name}: expected a finite number")
    lo, hi, length = (f.metadata.get(k) for k in ("lo", "hi", "length"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo = -MAX_INT if lo is None else lo
        hi = MAX_INT if hi is None else hi
        if not lo <= value <= hi:
            raise BadRequest(f"{name}: {value} is outside {lo}..{hi}")
    if isinstance(value, (str, bytes, list, dict)) and length is not None and len(value) > length:
        raise BadRequest(f"{name}: longer than {length}")


MAX_ID = 128  # characters of a peer or session id
MAX_BLOCK = 1 << 16  # no model has more blocks
MAX_PROBE = 4 << 20  # bytes of a link probe, either way
MAX_ENTRIES = 4096  # servers in a snapshot, sessions in an info reply
MAX_KEY = 64  # characters of a training pass's `keep` key


@dataclass(frozen=True)
class NextHop:
    """Where a server pushes a session's outputs: the next server's peer id and its session there."""

    peer_id: str
    session_id: str

    def to_wire(self) -> dict:
        return {"peer_id": self.peer_id, "session_id": self.session_id}

    @classmethod
    def from_wire(cls, d: object, name: str = "next") -> "NextHop":
        """Checked field by field: a peer names the next hop, and nothing it sends is trusted. No addresses:
        a server dials the next hop only where that peer's own signed announcement says it is."""
        if not isinstance(d, dict):
            raise BadRequest(f"{name}: expected {{peer_id, session_id}}")
        for field_name in ("peer_id", "session_id"):
            value = d.get(field_name)
            if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
                raise BadRequest(f"{name}.{field_name}: expected a string of 1..{MAX_ID} characters")
        return cls(d["peer_id"], d["session_id"])



# Control ---------------------------------------------------------------------------------------------


@dataclass
class Ping(Message):
    """A round-trip probe (one stream carries many)."""

    nonce: int = limits(0)


@dataclass
class Pong(Message):
    """The answer to a Ping, same nonce."""

    nonce: int = limits(0)


@dataclass
class Probe(Message):
    """Link-rate probe: `payload` up, then `reply_bytes` back."""
    payload: bytes = limits(length=MAX_PROBE)
    reply_bytes: int = limits(0, MAX_PROBE)


@dataclass
class ProbeReply(Message):
    """The bytes a link probe asked for."""

    payload: bytes = limits(length=MAX_PROBE)


@dataclass
class SnapshotRequest(Message):
    """Ask a peer for its swarm table (a newcomer's first view)."""

    model_id: str = limits(length=256, default="")  # empty: every model the peer knows


@dataclass
class Snapshot(Message):
    """A peer's swarm table: announcements and how long ago each was heard."""

    servers: list = limits(length=MAX_ENTRIES, default_factory=list)  # signed announcements (net/announce.py)
    ages: list = limits(length=MAX_ENTRIES, default_factory=list)  # seconds since the sender heard each one


@dataclass
class InfoRequest(Message):
    """Ask a server about itself."""

    pass


@dataclass
class InfoReply(Message):
    """A server's announcement, counters, and the cache length of each open session."""

    info: dict
    counters: dict = limits(length=256, default_factory=dict)
    session_lengths: list = limits(length=MAX_ENTRIES, default_factory=list)  # each open session's cache tokens


# Inference sessions -------------------------------------------------------------------------------


@dataclass
class OpenSession(Message):
    """Open an inference session on a server's blocks [start, end); the server names the session."""

    start: int = limits(0, MAX_BLOCK)
    end: int = limits(1, MAX_BLOCK)
    max_length: int = limits(1, MAX_INT)
    batch_size: int = limits(1, 1024, default=1)
    compression: str = limits(length=16, default="none")
    next: NextHop | None = None  # the next server's session, for pushes
    lora: dict | None = None  # LoraRef.to_wire(): adapters applied to every step of the session
    prev: str = limits(length=MAX_ID, default="")  # the only peer whose pushes this session takes ("": none)
    NEXT_HOPS: ClassVar[tuple[str, ...]] = ("next",)

    def validate(self) -> None:
        if self.end <= self.start:
            raise BadRequest(f"OpenSession: blocks {self.start}:{self.end} are empty")


@dataclass
class SessionOpened(Message):
    """The server took the session (its cache is reserved) and named it: an unguessable id that only the
    opener learns, and passes on to the server before it in the chain."""

    session_id: str = limits(length=MAX_ID)
    max_length: int = limits(1)


@dataclass
class Step(Message):
    """New tokens' hidden states for a session, at the position the caches should hold."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden", "position_ids", "attention_mask", "prompts")
    step_id: int = limits(0)
    position: int = limits(0)  # the cache length this step expects
    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    session_id: str = limits(length=MAX_ID, default="")  # set on pushes: which session of the receiving server
    want_output: bool = True  # False for replays: the answer is an acknowledgement without hidden states
    commitments: list = limits(length=MAX_COMMITMENTS, default_factory=list)  # on pushes: the hops' so far

    def validate(self) -> None:
        check_inputs(self)
        self.commitments = parse_commitments(self.commitments, "Step.commitments")


@dataclass
class StepResult(Message):
    """The last server's output for a step."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden",)
    step_id: int = limits(0)
    position: int = limits(0)
    hidden: torch.Tensor
    commitments: list = limits(length=MAX_COMMITMENTS, default_factory=list)  # one per hop, in chain order

    def validate(self) -> None:
        self.commitments = parse_commitments(self.commitments, "StepResult.commitments")
        if not self.hidden.is_floating_point() or self.hidden.dim() != 3:
            raise BadRequest(f"StepResult.hidden: expected a floating [batch, tokens, hidden] tensor, got "
                             f"{str(self.hidden.dtype).removeprefix('torch.')} {list(self.hidden.shape)}")


@dataclass
class HistoryRequest(Message):
    """Ask for the outputs a server kept for positions [0, before)."""

    before: int = limits(0)  # positions [0, before) of what this session pushed
    exact: bool = False  # uncompressed, whatever the session's compression (spot checks compare digests)


@dataclass
class History(Message):
    """A session's outputs for positions [0, before): the next hop's inputs, to rebuild a replacement."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden", "position_ids", "attention_mask")
    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor

    def validate(self) -> None:
        check_inputs(self)


@dataclass
class Relink(Message):
    """Change where a session pushes its outputs (failover)."""

    next: NextHop | None = None
    NEXT_HOPS: ClassVar[tuple[str, ...]] = ("next",)


@dataclass
class Predecessor(Message):
    """Take this session's pushes from `peer_id` from now on (a failover replaced the hop before it)."""

    peer_id: str = limits(length=MAX_ID)


@dataclass
class CloseSession(Message):
    """The client is done: free the session's cache."""

    pass


# Training passes -----------------------------------------------------------------------------------


@dataclass
class ForwardRequest(Message):
    """A training forward pass over blocks [start, end) (no session, no cache)."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden", "position_ids", "attention_mask", "prompts")
    start: int = limits(0, MAX_BLOCK)
    end: int = limits(1, MAX_BLOCK)
    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    compression: str = limits(length=16, default="none")
    lora: dict | None = None  # LoraRef.to_wire(): adapters for blocks [start, end), by hash, weights optional
    keep: str = limits(length=MAX_KEY, default="")  # non-empty: keep the graph for the BackwardRequest with this key

    def validate(self) -> None:
        check_inputs(self)


@dataclass
class ForwardReply(Message):
    """A training forward pass's output."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden",)
    hidden: torch.Tensor


@dataclass
class BackwardRequest(Message):
    """A training backward pass: the forward's input and the output's gradient."""

    TENSORS: ClassVar[tuple[str, ...]] = ("hidden", "grad_output", "position_ids", "attention_mask", "prompts")
    start: int = limits(0, MAX_BLOCK)
    end: int = limits(1, MAX_BLOCK)
    hidden: torch.Tensor
    grad_output: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    compression: str = limits(length=16, default="none")
    lora: dict | None = None
    keep: str = limits(length=MAX_KEY, default="")  # the ForwardRequest's `keep`: reuse its graph

    def validate(self) -> None:
        check_inputs(self)
        if self.grad_output.shape != self.hidden.shape:
            raise BadRequest(f"BackwardRequest.grad_output: {list(self.grad_output.shape)} where the hidden "
                             f"states' {list(self.hidden.shape)} is expected")


@dataclass
class BackwardReply(Message):
    """Gradients of a backward pass: the input's, the prompts', the LoRA tensors'."""

    TENSORS: ClassVar[tuple[str, ...]] = ("grad_input", "grad_prompts")
    grad_input: torch.Tensor
    grad_prompts: torch.Tensor | None = None
    grad_lora: list | None = limits(length=4096, default=None)  # encoded tensors, in LoraWeights.tensors() order
