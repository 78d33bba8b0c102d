"""A client node running in its own trio thread, for synchronous callers (the Python API, the CLI).

`SwarmClient` owns one trio run: the libp2p node, the swarm table and the RTT tracker live there, and
every call from the caller's thread goes through `call()` (trio.from_thread). Closing stops the run,
which closes every session and the host.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AsyncExitStack
from typing import Any, Awaitable, Callable

import trio

from ..model.errors import MeshError
from .latency import RttTracker
from .node import Node, NodeConfig, open_node
from .swarm import Swarm, open_swarm

__all__ = ["SwarmClient", "unwrap"]

log = logging.getLogger("mesh.client")


class SwarmClient:
    """A client node in a trio thread of its own, for synchronous callers (the API, the CLI)."""

    def __init__(self, config: NodeConfig, start_timeout: float = 60.0) -> None:
        self.config = config
        self.node: Node | None = None
        self.swarm: Swarm | None = None
        self.rtt: RttTracker | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mesh-client", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout):
            raise MeshError(f"the client node did not start within {start_timeout:.0f} s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # reported to the caller by __init__ or call()
            self._error = unwrap(e)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        async with AsyncExitStack() as stack:
            try:
                self.node = await stack.enter_async_context(open_node(self.config))
                self.swarm = await stack.enter_async_context(open_swarm(self.node))
            except BaseException as e:
                self._error = unwrap(e)
                self._ready.set()
                return
            self.rtt = RttTracker(self.node)
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run `await fn(*args)` in the client's trio thread and return its result (or raise its error)."""
        if self._token is None or not self._thread.is_alive():
            raise MeshError("the client node is not running")
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except BaseExceptionGroup as e:
            raise unwrap(e) from None

    def start_task(self, fn: Callable, *args: Any) -> Any:
        """Start `fn(*args, task_status=…)` in the node's nursery; return what it passes to started()."""
        async def start() -> Any:
            return await self.node.nursery.start(fn, *args)

        return self.call(start)

    def close(self) -> None:
        if self._token is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=15)

    def __enter__(self) -> "SwarmClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unwrap(e: BaseException) -> BaseException:
    """Errors from nurseries arrive in groups; callers want the mesh error inside."""
    while isinstance(e, BaseExceptionGroup):
        mesh_errors, _ = e.split(MeshError)
        e = (mesh_errors or e).exceptions[0]
    return e
