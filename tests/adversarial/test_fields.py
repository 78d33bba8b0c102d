"""Every field of every request, given a value of the wrong kind: the server answers a typed error naming
the field (never `internal`) and stays up."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mesh.net import wire
from mesh.net.messages import (BackwardRequest, ForwardRequest, HistoryRequest, InfoRequest, Message, OpenSession,
                               Ping, Predecessor, Probe, Relink, SnapshotRequest, Step)

from hostile import answers, error_code, peer, raw_call

pytestmark = pytest.mark.e2e

WRONG = [None, "x", 1.5, -1, 2 ** 64 - 1, True, [], {}, b"\x00", float("nan"),
         {"dtype": "float32", "shape": [1], "data": b"\x00" * 4},
         {"dtype": "int64", "shape": [1, 2, 64], "data": b"\x00" * 1024}]


def _step(n: int = 2) -> Step:
    return Step(1, 0, torch.randn(1, n, 64), torch.arange(n)[None])


REQUESTS: dict[str, list[Message]] = {
    "inference": [OpenSession(0, 3, 16)],
    "forward": [ForwardRequest(0, 3, torch.randn(1, 2, 64), torch.arange(2)[None])],
    "backward": [BackwardRequest(0, 3, torch.randn(1, 2, 64), torch.randn(1, 2, 64), torch.arange(2)[None])],
    "ping": [Ping(1)],
    "probe": [Probe(b"x", 4)],
    "info": [InfoRequest()],
    "swarm": [SnapshotRequest("m")],
}
IN_SESSION = [_step(), HistoryRequest(1), Relink(None), Predecessor("12D3KooW")]


def mutations(msg: Message):
    """The message's frame with one field replaced by each wrong value (and removed), where our own parser
    refuses the result: the server must refuse it as well, with a typed error."""
    frame = msg.to_wire()
    for f in dataclasses.fields(msg):
        for value in [*WRONG, KeyError]:
            bad = {k: v for k, v in frame.items() if k != f.name}
            if value is not KeyError:
                bad[f.name] = value
            try:
                Message.from_wire(bad)
            except Exception:
                yield f.name, bad
    yield "type", frame | {"type": "Nope"}
    yield "v", frame | {"v": "9.0.0"}


async def test_wrong_kinds_of_values_get_typed_errors(victims):
    first = victims.peer_ids[0]
    seen = 0
    async with peer(victims) as (evil, _):
        for protocol, messages in REQUESTS.items():
            for msg in messages:
                for name, bad in mutations(msg):
                    reply = await raw_call(evil, first, protocol, [bad])
                    code = error_code(reply)
                    assert code in ("bad_request", "unknown_version"), (protocol, name, bad, reply)
                    seen += 1
        async with evil.stream(first, "inference") as stream:  # the same inside an open session
            await wire.write_frame(stream, OpenSession(0, 3, 16).to_wire())
            assert "session_id" in await wire.read_frame(stream, timeout=10)
            for msg in IN_SESSION:
                for name, bad in mutations(msg):
                    await wire.write_frame(stream, bad)
                    reply = await wire.read_frame(stream, timeout=10)
                    assert error_code(reply) in ("bad_request", "unknown_version"), (name, bad, reply)
                    seen += 1
            # tensors of the right kinds but the wrong sizes or types for this model
            for bad in (Step(1, 0, torch.randn(1, 2, 65), torch.arange(2)[None]),
                        Step(1, 0, torch.randn(1, 2, 64), torch.arange(2.0)[None]),
                        Step(1, 0, torch.randn(1, 2, 64), torch.arange(3)[None]),
                        Step(1, 0, torch.randn(2, 2, 64), torch.arange(2)[None].expand(2, -1).contiguous()),
                        Step(1, 5, torch.randn(1, 2, 64), torch.arange(2)[None]),
                        Step(1, 0, torch.full((1, 2, 64), float("inf")), torch.arange(2)[None]),
                        Step(1, 0, torch.randn(1, 20, 64), torch.arange(20)[None])):
                await wire.write_frame(stream, bad.to_wire())
                reply = await wire.read_frame(stream, timeout=10)
                assert error_code(reply) in ("bad_request", "max_length"), (bad, reply)
                seen += 1
        assert await answers(evil, victims)
    assert seen > 300
