"""Commitments: each server signs a short digest of every step's output, so what it sent is on record.

A server's outputs in a chain go to the next server, not to the client, and a server asked later for what
it sent (`HistoryRequest`) could answer with other values than it pushed. So every output carries a
commitment: an 8-byte BLAKE2b digest of the tensor exactly as the receiver decodes it, signed with the
server's identity key over its session id, the step's position and token count. Commitments travel with
the pushes and come back with the last server's `StepResult` (one per hop, in chain order):

- the next server checks the digest of what it received against its predecessor's commitment, and
  refuses a push that does not match (so a server cannot push one thing and commit to another);
- the client keeps them, and a spot check (`net/verify.py`) first checks that each server's history
  matches its signed digests: a server whose history differs from what it signed is caught by its own
  signature, and the others' checks run on inputs proven to be what was sent.

On the wire a commitment is `[position, tokens, digest, signature]`: 8 + 64 bytes and two integers,
about 80 bytes per hop per step; a decode step carries one per hop.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import msgpack
import torch
from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from ..model.errors import BadRequest
from .codec import decode_tensor, encode_tensor

__all__ = ["Commitment", "digest", "as_received", "parse_commitments", "MAX_COMMITMENTS"]

DOMAIN = b"mesh/commitment/1:"
DIGEST_BYTES = 8
SIGNATURE_BYTES = 64
MAX_COMMITMENTS = 256  # hops in one chain


def digest(t: torch.Tensor) -> bytes:
    """The digest of a tensor's values as float32 (bf16/fp16 values convert exactly)."""
    raw = t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=DIGEST_BYTES).digest()


def as_received(t: torch.Tensor, compression: str) -> torch.Tensor:
    """What the receiver will decode from `t` sent with `compression` (itself when exact)."""
    if compression == "none":
        return t
    return decode_tensor(encode_tensor(t, compression)).to(t.dtype)


def _signed_bytes(session_id: str, position: int, tokens: int, value: bytes) -> bytes:
    return DOMAIN + session_id.encode() + struct.pack(">QQ", position, tokens) + value


@dataclass(frozen=True)
class Commitment:
    """One server's signed digest of one step's output: positions [position, position + tokens)."""

    position: int
    tokens: int
    digest: bytes
    signature: bytes

    @classmethod
    def make(cls, key: PrivateKey, session_id: str, position: int, output: torch.Tensor) -> "Commitment":
        value = digest(output)
        tokens = int(output.shape[1])
        return cls(position, tokens, value, key.sign(_signed_bytes(session_id, position, tokens, value)))

    def signed_by(self, peer_id: str, session_id: str) -> bool:
        """Whether `peer_id` (whose Ed25519 key its id holds) signed this for its session `session_id`."""
        try:
            key = ID.from_base58(peer_id).extract_public_key()
            return key is not None and key.verify(
                _signed_bytes(session_id, self.position, self.tokens, self.digest), self.signature)
        except Exception:  # a malformed id or signature is simply not a valid signature
            return False

    def matches(self, output: torch.Tensor) -> bool:
        return int(output.shape[1]) == self.tokens and digest(output) == self.digest

    def to_wire(self) -> list:
        return [self.position, self.tokens, self.digest, self.signature]


def parse_commitments(value: object, name: str) -> list[Commitment]:
    """A peer's list of commitments, each field checked."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_COMMITMENTS:
        raise BadRequest(f"{name}: expected a list of at most {MAX_COMMITMENTS} commitments")
    out = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 4 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                  and 0 <= x < 2 ** 53 for x in item[:2])
                and isinstance(item[2], bytes) and len(item[2]) == DIGEST_BYTES
                and isinstance(item[3], bytes) and len(item[3]) == SIGNATURE_BYTES):
            raise BadRequest(f"{name}: expected [position, tokens, digest, signature] items")
        out.append(Commitment(item[0], item[1], item[2], item[3]))
    return out


def wire_bytes(commitment: Commitment) -> int:
    """Bytes one commitment takes in a msgpack frame."""
    return len(msgpack.packb(commitment.to_wire()))
