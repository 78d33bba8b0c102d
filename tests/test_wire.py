"""Frames: round trips, limits, deadlines and malformed input, over memory streams and real libp2p."""

from __future__ import annotations

import struct

import msgpack
import pytest
import trio
import trio.testing

from mesh.model.errors import BadRequest, MaxLengthExceeded
from mesh.net import wire

from conftest import running_nodes


def pipes():
    a, b = trio.testing.memory_stream_pair()
    return wire.TrioByteStream(a), wire.TrioByteStream(b)


async def test_frame_round_trip():
    a, b = pipes()
    obj = {"x": 1, "data": b"\x00" * 1000, "nested": [1, "two", None]}
    async with trio.open_nursery() as n:
        n.start_soon(wire.write_frame, a, obj)
        assert await wire.read_frame(b, timeout=5) == obj


async def test_oversized_prefix_is_refused_before_allocating():
    a, b = pipes()
    await a.write(struct.pack(">I", 2**31))
    with pytest.raises(wire.FrameTooLarge):
        await wire.read_frame(b, timeout=5, max_size=1 << 20)


async def test_garbage_is_malformed():
    a, b = pipes()
    await a.write(struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(wire.MalformedFrame):
        await wire.read_frame(b, timeout=5)


async def test_truncated_frame_hits_eof():
    a, b = pipes()
    await a.write(struct.pack(">I", 100) + b"abc")
    await a.stream.send_eof()
    with pytest.raises(wire.StreamClosed):
        await wire.read_frame(b, timeout=5)


async def test_stalled_peer_hits_deadline():
    a, b = pipes()
    await a.write(struct.pack(">I", 100) + b"abc")
    with trio.fail_after(5):
        with pytest.raises(wire.FrameTimeout):
            await wire.read_frame(b, timeout=0.3)


def test_error_frames_map_back_to_types():
    for exc in (BadRequest("bad"), MaxLengthExceeded("long"), wire.Busy("full"), wire.UnknownVersion("v9")):
        with pytest.raises(type(exc)) as err:
            wire.raise_if_error(msgpack.unpackb(msgpack.packb(wire.error_frame(exc))))
        assert str(exc) in str(err.value)
    with pytest.raises(wire.RemoteError):
        wire.raise_if_error(wire.error_frame(ZeroDivisionError("x")))
    assert wire.raise_if_error({"ok": 1}) == {"ok": 1}


async def test_large_frames_over_libp2p():
    """16 MB frames cross a real Noise+Yamux stream (libp2p's read_exactly fails on these)."""
    async with running_nodes(2) as (a, b):
        await _echo_16mb(a, b)


async def _echo_16mb(a, b):
    await b.connect(a.addrs[0])
    payload = bytes(range(256)) * (16 * 4096)
    got = []

    async def echo(stream):
        frame = await wire.read_frame(stream, timeout=30)
        got.append(len(frame["blob"]))
        await wire.write_frame(stream, frame)

    a.set_handler("echo", echo)
    async with b.stream(a.peer_id, "echo") as s:
        await wire.write_frame(s, {"blob": payload})
        back = await wire.read_frame(s, timeout=60)
    assert got == [len(payload)] and back["blob"] == payload
