"""A server's announcement (ServerInfo): its fields, their bounds, and the signature that makes it its own.

Announcements are the swarm's shared state, and any peer can send one. So each is checked field by field
(types, finite numbers, lengths), numbers past what any real server reaches are clamped (a server cannot
draw every client's route by announcing 1e300 tokens/s, nor live forever with a TTL of 1e18), and each is
signed by the peer it describes: `SignedInfo` carries the announcement's bytes, the signer's public key
and the signature, and is accepted only when the key's peer id is the announced one. The same signed
bytes travel in gossip and in snapshots, so a peer passing on another's entry cannot change a byte of it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgpack
from libp2p.crypto.keys import PrivateKey
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID

from ..model.errors import BadRequest
from .messages import MAX_BLOCK

__all__ = ["ServerState", "ServerInfo", "SignedInfo", "MAX_RATE", "MAX_TTL", "MIN_TTL", "MAX_RECORD"]

MAX_RATE = 1e6  # per-block tokens/s (or hidden states/s of a link) no server reaches
MAX_TTL, MIN_TTL = 120.0, 1.0  # s an announcement lives without being heard again
MAX_PING = 60.0  # s of a next-hop RTT
MAX_RECORD = 1 << 16  # bytes of a signed announcement
DOMAIN = b"mesh/announcement/1:"  # signed bytes are this + the announcement: a signature means nothing else


class ServerState(enum.IntEnum):
    """A server's lifecycle as announced: clients route only to ONLINE servers."""

    OFFLINE = 0
    JOINING = 1
    DRAINING = 2
    ONLINE = 3


@dataclass
class ServerInfo:
    """A server's announcement: its blocks, state, throughput, addresses and what it runs."""

    peer_id: str
    model_id: str
    start: int
    end: int
    state: ServerState = ServerState.JOINING
    addrs: list[str] = field(default_factory=list)
    throughput: float = 0.0  # per-block tokens/s for balancing (balancing/throughput.py)
    inference_rps: float = 0.0  # single-token decode steps/s of one block (routing: k blocks take k / this)
    forward_rps: float = 0.0  # tokens/s of one block on long sequences
    network_rps: float = 0.0  # hidden states/s its link carries
    cache_tokens_free: int = 0
    sessions: int = 0  # inference sessions open on it
    batch: float = 0.0  # rows its recent passes carried, on average (continuous batching; 0: no pass yet)
    dtype: str = "float32"
    device: str = "cpu"  # the GPU's name, "mps" or "cpu"
    quant: str = "none"
    version: str = ""
    public_name: str = ""
    relayed: bool = False
    next_pings: dict[str, float] = field(default_factory=dict)  # peer id -> RTT s
    adapters: list[str] = field(default_factory=list)
    total_blocks: int = 0  # blocks of the whole model, so a table shows coverage without the model
    timestamp: float = 0.0
    ttl: float = 15.0

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def to_wire(self) -> dict:
        out = asdict(self)
        out["state"] = self.state.name
        return out

    @classmethod
    def from_wire(cls, d: object) -> "ServerInfo":
        """Every field checked (BadRequest naming it), rates and TTL clamped; unknown fields are ignored
        (newer peers), missing optional ones take defaults."""
        if not isinstance(d, dict):
            raise BadRequest("announcement: expected a map")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in d:
                values[f.name] = _CHECKS[f.name](f"announcement.{f.name}", d[f.name])
            elif f.default is f.default_factory is None:  # never: every field has a check
                pass
        for required in ("peer_id", "model_id", "start", "end"):
            if required not in values:
                raise BadRequest(f"announcement.{required}: missing")
        info = cls(**values)
        if not info.start < info.end or (info.total_blocks and info.end > info.total_blocks):
            raise BadRequest(f"announcement: blocks {info.start}:{info.end} of {info.total_blocks or '?'}")
        return info


def _string(limit: int, empty: bool = True):
    def check(name: str, v: object) -> str:
        if not isinstance(v, str) or len(v) > limit or (not empty and not v):
            raise BadRequest(f"{name}: expected a string of {0 if empty else 1}..{limit} characters")
        return v
    return check


def _integer(lo: int, hi: int):
    def check(name: str, v: object) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise BadRequest(f"{name}: expected an integer in {lo}..{hi}")
        return v
    return check


def _number(lo: float, hi: float, clamp: bool):
    """A finite number in [lo, hi]: clamped into it (`clamp`) or refused outside it."""
    def check(name: str, v: object) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise BadRequest(f"{name}: expected a finite number")
        if not lo <= v <= hi:
            if not clamp:
                raise BadRequest(f"{name}: {v} is outside {lo}..{hi}")
            v = min(max(v, lo), hi)
        return float(v)
    return check


def _strings(count: int, limit: int):
    def check(name: str, v: object) -> list[str]:
        if not isinstance(v, list) or len(v) > count or not all(isinstance(a, str) and len(a) <= limit for a in v):
            raise BadRequest(f"{name}: expected at most {count} strings of at most {limit} characters")
        return list(v)
    return check


def _pings(name: str, v: object) -> dict[str, float]:
    if not isinstance(v, dict) or len(v) > 32:
        raise BadRequest(f"{name}: expected a map of at most 32 peers")
    rtt = _number(0.0, MAX_PING, clamp=False)
    return {_string(128, empty=False)(f"{name} key", k): rtt(f"{name}[{str(k)[-8:]}]", x) for k, x in v.items()}


def _state(name: str, v: object) -> ServerState:
    if not isinstance(v, str) or v not in ServerState.__members__:
        raise BadRequest(f"{name}: expected one of {', '.join(ServerState.__members__)}")
    return ServerState[v]


def _boolean(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise BadRequest(f"{name}: expected a boolean")
    return v


_rate = _number(0.0, MAX_RATE, clamp=True)
_CHECKS = {
    "peer_id": _string(128, empty=False), "model_id": _string(256, empty=False),
    "start": _integer(0, MAX_BLOCK), "end": _integer(1, MAX_BLOCK), "state": _state,
    "addrs": _strings(16, 512), "throughput": _rate, "inference_rps": _rate, "forward_rps": _rate,
    "network_rps": _rate, "cache_tokens_free": _integer(0, 1 << 40),
    "sessions": _integer(0, 1 << 20), "batch": _number(0.0, 1024.0, clamp=True), "dtype": _string(32),
    "device": _string(64), "quant": _string(32),
    "version": _string(32), "public_name": _string(64), "relayed": _boolean, "next_pings": _pings,
    "adapters": _strings(64, 200), "total_blocks": _integer(0, MAX_BLOCK),
    "timestamp": _number(-1e12, 1e12, clamp=False), "ttl": _number(MIN_TTL, MAX_TTL, clamp=True),
}


@dataclass(frozen=True)
class SignedInfo:
    """An announcement as its author signed it: the bytes, the author's public key, the signature."""

    data: bytes
    key: bytes
    sig: bytes

    @classmethod
    def sign(cls, info: ServerInfo, private_key: PrivateKey) -> "SignedInfo":
        data = msgpack.packb(info.to_wire(), use_bin_type=True)
        return cls(data, private_key.get_public_key().serialize(), private_key.sign(DOMAIN + data))

    def to_bytes(self) -> bytes:
        return msgpack.packb({"data": self.data, "key": self.key, "sig": self.sig}, use_bin_type=True)

    @classmethod
    def open(cls, raw: object) -> tuple["SignedInfo", ServerInfo]:
        """Check a signed announcement from a peer; BadRequest unless the announced peer signed it."""
        if not isinstance(raw, bytes) or len(raw) > MAX_RECORD:
            raise BadRequest(f"announcement: expected at most {MAX_RECORD} bytes")
        try:
            d = msgpack.unpackb(raw, raw=False)
        except Exception as e:
            raise BadRequest(f"announcement: not msgpack ({type(e).__name__})") from None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), bytes) for k in ("data", "key", "sig")):
            raise BadRequest("announcement: expected {data, key, sig} bytes")
        signed = cls(d["data"], d["key"], d["sig"])
        try:
            info = ServerInfo.from_wire(msgpack.unpackb(signed.data, raw=False))
        except BadRequest:
            raise
        except Exception as e:
            raise BadRequest(f"announcement: not msgpack ({type(e).__name__})") from None
        try:
            public = deserialize_public_key(signed.key)
            ok = ID.from_pubkey(public).to_base58() == info.peer_id and public.verify(DOMAIN + signed.data, signed.sig)
        except Exception:
            ok = False
        if not ok:
            raise BadRequest(f"announcement: not signed by {info.peer_id[-8:]}, the peer it describes")
        return signed, info
