"""A swarm of `mesh serve` processes in the network lab (tests/netlab.py; needs root), for the benches
that measure over an emulated WAN: a client host and one host per server, every host-to-host crossing
delayed by `delay_ms` one way and every host's link capped at `mbit` in each direction. Each server
hosts an equal span of the model with one compute thread."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import netlab  # noqa: E402
from procs import MeshProcess  # noqa: E402

__all__ = ["LabSwarm", "lab_arguments", "lab_swarm", "spans"]


@dataclass
class LabSwarm:
    lab: "netlab.Lab"
    user: "netlab.Host"  # the client's host
    boot: str  # the first server's multiaddr
    rtt: float  # seconds, client <-> first server, measured through the lab


def lab_arguments(description: str, tokens: int, logs: str) -> argparse.Namespace:
    """The command line every lab bench takes: model, servers, delay, bandwidth, tokens, log folder."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--delay-ms", type=float, default=25.0)
    p.add_argument("--mbit", type=float, default=100.0)
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--logs", type=Path, default=Path(logs))
    return p.parse_args()


def spans(num_blocks: int, servers: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return list(zip(bounds, bounds[1:]))


@contextmanager
def lab_swarm(model: str, num_blocks: int, servers: int, delay_ms: float, mbit: float,
              logs: Path) -> Iterator[LabSwarm]:
    reason = netlab.unavailable()
    if reason:
        sys.exit(f"{Path(sys.argv[0]).name}: {reason}")
    logs.mkdir(parents=True, exist_ok=True)
    with netlab.Lab() as lab:
        user = lab.host("client")
        hosts = [lab.host(f"s{i + 1}") for i in range(servers)]
        for h in [user, *hosts]:
            lab.cap(h, mbit)
        lab.delay(delay_ms)
        rtt = lab.rtt(user, hosts[0])  # the emulator itself: 2 x delay expected
        procs, boot = [], None
        try:
            for i, (h, (a, b)) in enumerate(zip(hosts, spans(num_blocks, servers))):
                args = ["serve", model, "--blocks", f"{a}:{b}", "--listen", f"/ip4/{h.ip}/tcp/31337",
                        "--new-identity", "--threads", "1", "--bandwidth", str(mbit)]
                if boot:
                    args += ["--initial-peers", boot]
                proc = MeshProcess(args, logs / f"server{i + 1}.log", env={"HF_HUB_OFFLINE": "1"}, netns=h.ns)
                lab.procs.append(proc.proc)
                procs.append(proc)
                addr = proc.wait_ready_sync(180)
                boot = boot or addr
            yield LabSwarm(lab, user, boot, rtt)
        finally:
            for proc in procs:
                proc.cleanup()
