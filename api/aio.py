"""Sessions for code running in the client node's own trio loop (the HTTP API): every step is awaited
there, so one loop carries many concurrent sessions with no thread per session and no hop between loops.

    async with open_async_session(model, max_length=256) as session:   # in model.client's trio run
        async for token in session.stream(ids, None, model.sampling(max_new_tokens=20)):
            ...
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

import torch

from ..model.generation import Generator, SamplingConfig
from ..model.speculative import new_speculator
from ..net.inference import InferenceSession, open_inference_session

if TYPE_CHECKING:
    from . import DistributedModelForCausalLM

__all__ = ["AsyncSession", "open_async_session"]


class AsyncSession:
    """One inference session: the remote chain and the generation state (tokens so far) over it."""

    def __init__(self, model: "DistributedModelForCausalLM", remote: InferenceSession) -> None:
        self.remote = remote
        self.generator = Generator(model.head, None, model.tokenizer, prefix=model.prefix,
                                   speculator=new_speculator(model.speculate, model.draft))

    def describe(self) -> str:
        return self.remote.describe()

    async def _run_blocks(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None, position: int) -> torch.Tensor:
        out = await self.remote.step(hidden.to(torch.float32), position_ids, attention_mask, position)
        return out.to(hidden.dtype)

    async def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     config: SamplingConfig) -> AsyncIterator[torch.Tensor]:
        """Each step's new tokens [B] as they are sampled (spot checks included when the model has them)."""
        check = self.remote.spot_check if self.remote.cfg.checker is not None else None
        async for token in self.generator.astream(input_ids, attention_mask, config, self._run_blocks, check):
            yield token


@asynccontextmanager
async def open_async_session(model: "DistributedModelForCausalLM", max_length: int,
                             batch_size: int = 1) -> AsyncIterator[AsyncSession]:
    """An inference session of `model` for `max_length` tokens, closed on the servers when the block ends
    (also when it is cancelled: a client that went away frees its caches at once)."""
    extra = 0 if model.prefix is None else model.prefix.shape[0]
    async with open_inference_session(model.chain_config(max_length + extra, batch_size)) as remote:
        yield AsyncSession(model, remote)
