"""Shadows: a checker's own cached run of one hop's blocks, fed the hop's inputs as checks come.

Re-executing a decode step needs every earlier position's keys and values, so a stateless re-execution
costs a forward pass over the whole history at every check. A shadow keeps a cache instead: an inference
session on an independent server (`RemoteShadow`), or the client's own blocks with a local cache
(`LocalShadow`). Each check feeds it only the positions since the previous one, so all checks of a
generation together cost about one prefill of it, whatever the rate, and every position gets compared
once. A check that rewinds (a lie was found) just feeds from an earlier position: the cache rolls back.
"""

from __future__ import annotations

import itertools
from contextlib import AsyncExitStack
from typing import Protocol

import torch
import trio

from ..model.span import Span
from . import wire
from .adapters import ClientLora
from .announce import ServerInfo
from .client import open_session
from .messages import Step, StepResult
from .node import Node

__all__ = ["Shadow", "RemoteShadow", "LocalShadow", "open_shadow", "CHUNK"]

CHUNK = 512  # positions per step when a shadow catches up


class Shadow(Protocol):
    """Blocks [start, end) with a cache of `fed` positions, run on `holder` (None: the client's own)."""

    holder: ServerInfo | None
    fed: int

    async def run(self, position: int, hidden: torch.Tensor, position_ids: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor: ...

    async def aclose(self) -> None: ...


class RemoteShadow:
    """An inference session on an independent server, read directly (it pushes nowhere)."""

    def __init__(self, holder: ServerInfo, session, stack: AsyncExitStack, timeout: float) -> None:
        self.holder, self.session, self.stack, self.timeout = holder, session, stack, timeout
        self.fed = 0
        self._ids = itertools.count(1)

    async def run(self, position: int, hidden: torch.Tensor, position_ids: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        outs = []
        for a in range(0, hidden.shape[1], CHUNK):
            b = min(hidden.shape[1], a + CHUNK)
            step = Step(next(self._ids), position + a, hidden[:, a:b], position_ids[:, a:b], mask[:, a:b])
            await self.session.send(step, self.timeout)
            frame = await wire.read_frame(self.session.stream, timeout=self.timeout)
            out = StepResult.from_wire(wire.raise_if_error(frame)).hidden
            if tuple(out.shape) != tuple(step.hidden.shape):
                raise wire.Unavailable(f"a checker answered {list(out.shape)} for {list(step.hidden.shape)}")
            outs.append(out)
        self.fed = position + hidden.shape[1]
        return torch.cat(outs, dim=1)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(3):
            try:
                await self.stack.aclose()
            except Exception:
                pass


class LocalShadow:
    """The client's own blocks with a cache of their own, computed in a worker thread."""

    holder = None

    def __init__(self, span: Span, batch_size: int, max_length: int) -> None:
        self.span, self.cache = span, span.new_cache(batch_size, max_length)
        self.fed = 0

    async def run(self, position: int, hidden: torch.Tensor, position_ids: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        def compute() -> torch.Tensor:
            self.cache.start_at(position)
            with torch.no_grad():
                return self.span(hidden, position_ids, self.cache, mask).detach().cpu()

        out = await trio.to_thread.run_sync(compute)
        self.fed = position + hidden.shape[1]
        return out

    async def aclose(self) -> None:
        pass


async def open_shadow(node: Node, holder: ServerInfo | None, start: int, end: int, *, max_length: int,
                      batch_size: int, lora: ClientLora | None, local: Span | None,
                      timeout: float = 60.0) -> Shadow:
    """A shadow of blocks [start, end) on `holder`, or on `local` blocks when `holder` is None."""
    if holder is None:
        return LocalShadow(local.sub(start, end), batch_size, max_length)
    stack = AsyncExitStack()
    try:
        session = await stack.enter_async_context(open_session(node, holder, start, end, max_length, batch_size,
                                                               lora=lora, timeout=min(timeout, 30.0)))
    except BaseException:
        await stack.aclose()
        raise
    return RemoteShadow(holder, session, stack, timeout)
