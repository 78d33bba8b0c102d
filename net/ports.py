"""Listen ports that belong to one process.

libp2p binds its listeners with SO_REUSEPORT (for hole punching), so a second server started on a port
that another one already listens on would start "fine" and the kernel would hand it half of the first
one's connections: peers dialling one peer id would reach the other and fail the handshake. So a node
first checks its ports with a plain bind, which fails while anyone listens there. Two servers starting at
once could both see the same port free before either binds, so the check and the bind happen under a
lock shared by this user's mesh processes (a file lock beside the identities), released once the host
listens.
"""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio

from ..model.errors import MeshError
from .identity import default_identity_path

__all__ = ["claim_ports", "port_lock"]

LOCK_WAIT = 30.0  # seconds another starting node may hold the lock (it holds it for the time of a bind)


@asynccontextmanager
async def port_lock(path: Path | None = None) -> AsyncIterator[None]:
    """Hold the machine's port lock (this user's) until the body has bound its listeners."""
    path = path or default_identity_path().with_name("ports.lock")
    try:
        import fcntl
    except ImportError:  # no flock on this platform: the plain-bind check alone
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        with trio.fail_after(LOCK_WAIT):
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    await trio.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def claim_ports(listen: list[str], *, fallback: bool, tries: int = 16) -> list[str]:
    """`listen` with every TCP port checked free; with `fallback` (the default address), a taken port
    moves to the next free one, otherwise it is refused with a one-line error."""
    out = []
    for addr in listen:
        ip, port = _tcp_endpoint(addr)
        if ip is None or port == 0:
            out.append(addr)
            continue
        for candidate in range(port, port + (tries if fallback else 1)):
            if _port_free(ip, candidate):
                out.append(addr.replace(f"/tcp/{port}", f"/tcp/{candidate}", 1))
                break
        else:
            raise MeshError(f"cannot listen on {addr}: the port is in use by another process here",
                            hint="pass --listen /ip4/0.0.0.0/tcp/PORT with a free port (0 picks one)")
    return out


def _tcp_endpoint(addr: str) -> tuple[str | None, int]:
    parts = addr.strip("/").split("/")
    if len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp" and parts[3].isdigit():
        return parts[1], int(parts[3])
    return None, 0


def _port_free(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, port))  # without SO_REUSEPORT: fails while anyone listens there
        except OSError:
            return False
    return True
