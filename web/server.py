"""Serve an ASGI app from inside a running trio loop (Hypercorn's trio worker)."""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from ..model.errors import MeshError

__all__ = ["serve_http", "LOOPBACK"]

LOOPBACK = "127.0.0.1"
log = logging.getLogger("mesh.http")


async def serve_http(app, host: str = LOOPBACK, port: int = 8000, *,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on host:port until cancelled; tells `task_status` the base URL (port 0: one the OS picks)."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # the app logs one line per request itself
    config.errorlog = log
    config.keep_alive_timeout = 30
    config.graceful_timeout = 1.0

    async def started(task_status=trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(started)
        except* OSError as group:  # the port is taken, or the address is not this machine's
            error = group
            while isinstance(error, BaseExceptionGroup):
                error = error.exceptions[0]
            raise MeshError(f"cannot listen on {host}:{port}: {error.strerror or error}",
                            hint="pass another --port, or --port 0 for any free one") from None
        task_status.started(binds[0])
