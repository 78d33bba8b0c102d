"""Frames on a libp2p stream: a 4-byte big-endian length, then msgpack.

Every read has a deadline and a size limit checked before anything is allocated, and the bytes are
read with our own loop (libp2p's `read_exactly` gives up after 100 partial reads). Errors travel as
`{"error": {"code", "message"}}` frames and come back out as the same typed exception.
"""

from __future__ import annotations

import struct
from typing import Any, AsyncContextManager, Protocol

import msgpack
import trio

from ..model.errors import (BadRequest, CacheTrimmed, MaxLengthExceeded, MeshError, ModelLoadError, ModelNotFound,
                            SpanOutOfRange, UnsupportedArchitecture)

__all__ = ["PROTOCOL_VERSION", "ByteStream", "FrameBudget", "TrioByteStream", "protocol_id", "WireError", "FrameTooLarge",
           "FrameTimeout", "MalformedFrame", "StreamClosed", "UnknownVersion", "Busy", "Unavailable",
           "AdapterUnknown", "NotAllowed", "RemoteError", "read_exact", "pack", "write_frame", "read_frame", "error_frame",
           "raise_if_error", "close_quietly", "reset_quietly", "short_id"]

PROTOCOL_VERSION = "1.0.0"
MAX_FRAME = 256 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0
BODY_TIMEOUT = 30.0  # a frame, once its header arrived, must arrive whole within this
_LENGTH = struct.Struct(">I")


class ByteStream(Protocol):
    """What the framing needs of a stream: read, write, close (libp2p streams, or trio's in tests)."""

    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


class TrioByteStream:
    """A trio stream with libp2p's `read`/`write` interface, so the same framing runs over raw TCP."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def read(self, n: int | None = None) -> bytes:
        data = await self.stream.receive_some(n)
        if not data:
            raise EOFError
        return data

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)


def protocol_id(name: str, version: str = PROTOCOL_VERSION) -> str:
    """`/mesh/<name>/<version>`: libp2p negotiates the exact id, our frames carry the version too."""
    return f"/mesh/{name}/{version}"


class WireError(MeshError):
    """A frame could not be read or written."""

    code = "wire"


class FrameTooLarge(WireError):
    """A frame over the size limit (checked before allocating)."""

    code = "too_large"


class FrameTimeout(WireError):
    """A frame did not arrive in time."""

    code = "timeout"


class MalformedFrame(WireError):
    """Bytes that are not a frame of this protocol."""

    code = "bad_request"


class StreamClosed(WireError):
    """The stream ended (the peer closed or died)."""

    code = "closed"


class UnknownVersion(WireError):
    """A frame of a protocol version this node does not speak."""

    code = "unknown_version"


class Busy(MeshError):
    """The server has no room (cache budget): try another."""

    code = "busy"


class Unavailable(MeshError):
    """The server cannot serve now (loading, draining, a failed push): reroute."""

    code = "unavailable"


class AdapterUnknown(MeshError):
    """The request named an adapter by key without its weights, and the server does not hold it."""

    code = "adapter_unknown"


class NotAllowed(MeshError):
    """The server serves only the peers on its allow-list (net/allowlist.py)."""

    code = "not_allowed"


class RemoteError(MeshError):
    """An error the remote reported with a code we do not know."""

    code = "internal"


# Codes a reply may carry, mapped back to the exception raised on the caller's side.
ERRORS: dict[str, type[MeshError]] = {
    "bad_request": BadRequest,
    "not_allowed": NotAllowed,
    "max_length": MaxLengthExceeded,
    "cache_trimmed": CacheTrimmed,
    "too_large": FrameTooLarge,
    "timeout": FrameTimeout,
    "closed": StreamClosed,
    "unknown_version": UnknownVersion,
    "busy": Busy,
    "unavailable": Unavailable,
    "adapter_unknown": AdapterUnknown,
    "not_found": ModelNotFound,
    "load_error": ModelLoadError,
    "unsupported": UnsupportedArchitecture,
    "internal": RemoteError,
}
assert SpanOutOfRange.code in ERRORS


async def read_exact(stream: ByteStream, n: int) -> bytes:
    """Exactly n bytes from the stream, or StreamClosed."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except EOFError as e:  # libp2p's StreamEOF, also raised for a reset on read
            raise StreamClosed("the peer closed the stream") from e
        except Exception as e:
            if _is_stream_failure(e):
                raise StreamClosed(f"the stream failed: {type(e).__name__}") from e
            raise
        if not chunk:
            raise StreamClosed("the peer closed the stream")
        buf += chunk
    return bytes(buf)


def _is_stream_failure(e: Exception) -> bool:
    from libp2p.exceptions import BaseLibp2pError

    return isinstance(e, (BaseLibp2pError, trio.BrokenResourceError, trio.ClosedResourceError, OSError))


def pack(obj: Any) -> bytes:
    """A message as one frame's bytes (length prefix and msgpack)."""
    payload = msgpack.packb(obj, use_bin_type=True)
    return _LENGTH.pack(len(payload)) + payload


async def write_frame(stream: ByteStream, obj: Any, *, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Send one frame; return its size in bytes."""
    data = pack(obj)
    if len(data) - 4 > MAX_FRAME:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        with trio.fail_after(timeout):
            await stream.write(data)
    except trio.TooSlowError as e:
        raise FrameTimeout(f"no progress writing a frame for {timeout:.0f} s") from e
    except Exception as e:
        if _is_stream_failure(e):
            raise StreamClosed(f"cannot write: {type(e).__name__}") from e
        raise
    return len(data)


class FrameBudget(Protocol):
    """Who may receive how many frame bytes at once (net/quotas.py InFlight)."""

    def hold(self, peer: str, size: int) -> AsyncContextManager[None]: ...


async def read_frame(stream: ByteStream, *, timeout: float = DEFAULT_TIMEOUT, max_size: int = MAX_FRAME,
                     body_timeout: float = BODY_TIMEOUT, budget: FrameBudget | None = None) -> Any:
    """Read one frame: its header within `timeout` s (an idle wait), then its body within `body_timeout`
    s (a peer that begins a frame must finish it); the size limit is checked before allocating. With a
    `budget`, the body is read only once the sending peer's frames in flight leave room for it."""
    try:
        with trio.fail_after(timeout):
            (size,) = _LENGTH.unpack(await read_exact(stream, 4))
    except trio.TooSlowError as e:
        raise FrameTimeout(f"no frame within {timeout:.1f} s") from e
    if size > max_size:
        raise FrameTooLarge(f"frame of {size} bytes exceeds the {max_size}-byte limit")
    try:
        with trio.fail_after(min(timeout, body_timeout)):
            if budget is None:
                payload = await read_exact(stream, size)
            else:
                async with budget.hold(stream.muxed_conn.peer_id.to_base58(), size):
                    payload = await read_exact(stream, size)
    except trio.TooSlowError as e:
        raise FrameTimeout(f"a frame of {size} bytes did not arrive within {min(timeout, body_timeout):.1f} s") from e
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:
        raise MalformedFrame(f"frame is not valid msgpack ({type(e).__name__})") from e


def error_frame(exc: BaseException, **context: object) -> dict:
    """`context` (e.g. step_id, peer_id) tells the receiver which step or peer the error is about."""
    if isinstance(exc, MeshError):
        err = {"code": exc.code, "message": str(exc), "hint": exc.hint}
    else:
        err = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"[:500], "hint": ""}
    return {"error": err | context}


def raise_if_error(frame: Any) -> Any:
    """Return `frame` unless it is an error frame, which is raised as its typed exception. A peer writes
    the error, so each of its fields is checked: a malformed error is still an error, never a crash."""
    if isinstance(frame, dict) and "error" in frame:
        err = frame["error"] if isinstance(frame["error"], dict) else {"message": str(frame["error"])[:200]}
        code, message, hint = (err.get(k) for k in ("code", "message", "hint"))
        cls = ERRORS.get(code, RemoteError) if isinstance(code, str) else RemoteError
        exc = cls(f"remote: {str(message)[:500]}", hint=str(hint or "")[:200])
        step_id, peer_id = err.get("step_id"), err.get("peer_id")
        exc.step_id = step_id if isinstance(step_id, int) and not isinstance(step_id, bool) else None  # type: ignore[attr-defined]
        exc.peer_id = peer_id if isinstance(peer_id, str) and len(peer_id) <= 128 else None  # type: ignore[attr-defined]
        raise exc
    return frame


async def close_quietly(stream) -> None:
    """Close a stream whose peer may already be gone."""
    try:
        await stream.close()
    except Exception:
        pass


async def reset_quietly(stream) -> None:
    """Reset a stream whose peer may already be gone."""
    try:
        await stream.reset()
    except Exception:
        pass


def short_id(peer_id: str) -> str:
    """How logs and error messages name a peer: the last 8 characters of its id."""
    return str(peer_id)[-8:]
