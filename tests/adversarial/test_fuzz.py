"""Property: whatever frame a peer sends to any handler of a live server, the answer is a result or a typed
error (never `internal`), and the server stays up with its memory bounded.

Frames start from a valid message of each type and have some fields replaced by arbitrary msgpack values
or tensor-like maps. `MESH_FUZZ_EXAMPLES` sets the number of cases (CI runs a small number; a long run is
`MESH_FUZZ_EXAMPLES=20000 pytest tests/adversarial/test_fuzz.py -s`, which prints the counts and the
server's memory before and after).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import Counter

import pytest
import torch
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.net import wire
from mesh.net.messages import (BackwardRequest, ForwardRequest, HistoryRequest, InfoRequest, OpenSession, Ping,
                               Probe, SnapshotRequest, Step)

from hostile import answers, error_code, peer, raw_call

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("MESH_FUZZ_EXAMPLES", "150"))
MiB = 1 << 20

TEMPLATES = {
    "inference": OpenSession(0, 3, 16),
    "forward": ForwardRequest(0, 3, torch.randn(1, 2, 64), torch.arange(2)[None]),
    "backward": BackwardRequest(0, 3, torch.randn(1, 2, 64), torch.randn(1, 2, 64), torch.arange(2)[None]),
    "ping": Ping(1),
    "probe": Probe(b"x", 4),
    "info": InfoRequest(),
    "swarm": SnapshotRequest(""),
    "session": Step(1, 0, torch.randn(1, 2, 64), torch.arange(2)[None]),
    "history": HistoryRequest(1),
}

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=64))
tensors = st.fixed_dictionaries({
    "dtype": st.sampled_from(["float32", "float16", "bfloat16", "int64", "int8", "bool", "complex64", "x"]),
    "shape": st.lists(st.integers(min_value=-2, max_value=70), max_size=4),
    "data": st.binary(max_size=2048),
}, optional={"codec": st.sampled_from(["none", "int8", "float16", "zstd"]), "scales": st.binary(max_size=64),
             "oidx": st.binary(max_size=16), "oval": st.binary(max_size=16)})
values = st.recursive(st.one_of(scalars, tensors), lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)


@st.composite
def frames(draw) -> tuple[str, dict]:
    kind = draw(st.sampled_from(sorted(TEMPLATES)))
    frame = TEMPLATES[kind].to_wire()
    names = [f.name for f in dataclasses.fields(TEMPLATES[kind])] + ["v", "extra"]
    if kind not in ("session", "history"):  # in a session, some other types are rightly not answered
        names.append("type")
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
        if draw(st.booleans()) and name in frame:
            del frame[name]
        else:
            frame[name] = draw(values)
    return kind, frame


class Attacker:
    """A node of its own in a thread with its own trio loop, so hypothesis' synchronous examples can use it."""

    def __init__(self, victims) -> None:
        self.victims = victims
        self.ready = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.thread.start()
        assert self.ready.wait(60), "the attacker's node did not start"

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.stop = trio.Event()
        async with peer(self.victims, follow=False) as (self.node, _):
            async with self.node.stream(self.victims.peer_ids[0], "inference") as stream:
                await wire.write_frame(stream, OpenSession(0, 3, 256).to_wire())
                await wire.read_frame(stream, timeout=10)
                self.session = stream
                self.ready.set()
                await self.stop.wait()

    def call(self, fn, *args):
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self.thread.join(30)


async def _send(attacker: Attacker, kind: str, frame: dict) -> object:
    victims = attacker.victims
    with trio.fail_after(30):
        if kind in ("session", "history"):  # inside the open session: every frame is answered
            await wire.write_frame(attacker.session, frame)
            return await wire.read_frame(attacker.session, timeout=20)
        return await raw_call(attacker.node, victims.peer_ids[0], kind, [frame], timeout=20)


def test_no_frame_gets_an_internal_error_or_ends_the_server(victims):
    attacker = Attacker(victims)
    codes: Counter[str] = Counter()
    rss0 = victims.rss()[0]
    try:
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 1000, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(frames())
        def check(case: tuple[str, dict]) -> None:
            kind, frame = case
            reply = attacker.call(_send, attacker, kind, frame)
            if isinstance(reply, wire.StreamClosed):
                code = "closed"
            elif isinstance(reply, Exception):
                raise AssertionError(f"{kind}: {reply!r} for {frame!r}")
            else:
                code = error_code(reply) or "ok"
            codes[code] += 1
            assert code != "internal", (kind, frame, reply)
            if kind in ("session", "history") and code == "closed":
                raise AssertionError(f"the session ended on {frame!r}")

        check()
        assert attacker.call(answers, attacker.node, victims)
    finally:
        attacker.close()
    growth = victims.rss()[0] - rss0
    print(f"\nfuzz: {sum(codes.values())} frames, replies {dict(codes)}; server RSS {rss0 / MiB:.0f} MiB before, "
          f"{(rss0 + growth) / MiB:.0f} MiB after")
    assert victims.alive() and growth < 64 * MiB
