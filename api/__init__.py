"""The Python API: a causal LM whose blocks run in the swarm.

    from .. import DistributedModelForCausalLM
    model = DistributedModelForCausalLM.from_pretrained("llama-2-70b", initial_peers=[...])
    ids = model.tokenizer("A cat", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=20)               # like transformers' generate()
    with model.inference_session(max_length=512) as session:   # several calls, caches kept on servers
        model.generate(ids, max_new_tokens=8, session=session)
        model.generate(more_ids, max_new_tokens=8, session=session)

The client holds only the embeddings, the final norm and the LM head; every block runs on servers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import trio

from ..model.device import Device
from ..model.errors import BadRequest, MeshError
from ..model.generation import Generator, SamplingConfig
from ..model.head import ClientHead, load_head, load_tokenizer
from ..model.sources import ModelSource, resolve_model
from ..model.speculative import load_draft, new_speculator, parse_speculate
from ..net.adapters import ClientLora
from ..model.span import Span
from ..net.announce import ServerInfo
from ..net.chain import BanList, ChainConfig, accept_any
from ..net.client import remote_forward
from ..net.messages import History
from ..net.shadows import Shadow, open_shadow
from ..net.verify import COMPRESSION_ERROR, SpotChecker, caught_path, verify_rate
from ..net.inference import InferenceSession, is_exact, open_inference_session
from ..net.node import NodeConfig, env_initial_peers
from ..net.portal import SwarmClient, unwrap
from ..net.swarm import block_ranges
from ..net.swarmkey import swarm_key_from

__all__ = ["SwarmSession", "DistributedModelForCausalLM"]

log = logging.getLogger("mesh.api")


class SwarmSession:
    """An inference session through the swarm, used from synchronous code; keeps the generation state."""

    def __init__(self, model: "DistributedModelForCausalLM", max_length: int, batch_size: int) -> None:
        self.model = model
        self.max_length = max_length
        self.batch_size = batch_size
        client = model.client
        extra = 0 if model.prefix is None else model.prefix.shape[0]
        self._remote, self._done = client.start_task(self._hold, max_length + extra, batch_size)
        self.generator = Generator(model.head, self.run_blocks, model.tokenizer, prefix=model.prefix,
                                   speculator=new_speculator(model.speculate, model.draft))
        if self._remote.cfg.checker is not None:
            self.generator.check_all = self.check_all

    async def _hold(self, max_length: int, batch_size: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        model = self.model
        started = False
        try:
            async with open_inference_session(model.chain_config(max_length, batch_size)) as session:
                done = trio.Event()
                task_status.started((session, done))
                started = True
                await done.wait()
        except Exception as e:
            if not started:  # opening failed: the caller gets the (unwrapped) error
                raise unwrap(e) from None
            log.warning("inference session ended: %s", e)  # never take the client node down

    @property
    def remote(self) -> InferenceSession:
        return self._remote

    def describe(self) -> str:
        return self._remote.describe()

    def run_blocks(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position: int) -> torch.Tensor:
        dtype = hidden.dtype
        out = self.model.client.call(self._remote.step, hidden.to(torch.float32), position_ids, attention_mask,
                                     position)
        return out.to(dtype)

    def check_all(self, end: int) -> None:
        """Spot-check every hop's outputs for cache positions [0, end); raises Rewind if one lied."""
        self.model.client.call(self._remote.spot_check, end)

    def close(self) -> None:
        if self._done is not None:
            try:
                self.model.client.call(_set, self._done)
            except MeshError:
                pass
            self._done = None

    def __enter__(self) -> "SwarmSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _set(event: trio.Event) -> None:
    event.set()


class DistributedModelForCausalLM:
    """A causal LM whose blocks run in the swarm, used like a transformers model."""

    def __init__(self, source: ModelSource, head: ClientHead, tokenizer, client: SwarmClient,
                 compression: str = "none", route_wait: float = 30.0, exact: bool = False) -> None:
        self.accept = self._base_accept = is_exact if exact else accept_any  # exact: float32, unquantized only
        self.route_wait = route_wait  # how long a session waits for a server holding missing blocks
        self.bans = BanList()  # peers that failed this client, shared by its sessions
        self.source = source
        self.head = head
        self.tokenizer = tokenizer
        self.client = client
        self.compression = compression
        self.lora: ClientLora | None = None  # applied by the servers in every new session
        self.prefix: torch.Tensor | None = None  # trained virtual tokens fed before every session's input
        self.speculate: str | int = "off"  # drafts per pass in new sessions: off, auto or a fixed number
        self.draft: torch.nn.Module | None = None  # a local draft model (None: prompt lookup)
        self.verify = 0.0  # fraction of steps spot-checked on independent servers (net/verify.py)
        self.local_blocks: Span | None = None  # blocks this client holds: a checker and referee of its own

    def chain_config(self, max_length: int, batch_size: int = 1) -> ChainConfig:
        """How a new inference session finds, uses and checks its servers (caches of `max_length` tokens)."""
        client = self.client
        return ChainConfig(client.node, client.swarm.table, client.rtt, self.source.model_id, self.num_blocks,
                           max_length, batch_size, compression=self.compression, bans=self.bans,
                           route_wait=self.route_wait, accept=self.accept, lora=self.lora,
                           checker=self.new_checker(max_length, batch_size))

    def new_checker(self, max_length: int = 0, batch_size: int = 1) -> SpotChecker | None:
        """Spot checks for a new session (its sizes), or None with `verify` 0."""
        if self.verify <= 0:
            return None
        node, table, model_id = self.client.node, self.client.swarm.table, self.source.model_id
        local = self.local_blocks if self.lora is None else None  # a local check would need the adapter

        async def shadow(info: ServerInfo | None, start: int, end: int) -> Shadow:
            return await open_shadow(node, info, start, end, max_length=max_length, batch_size=batch_size,
                                     lora=self.lora, local=local)

        async def execute(info: ServerInfo | None, start: int, end: int, inputs: History) -> torch.Tensor:
            if info is None:
                span = self.local_blocks.sub(start, end)
                return await trio.to_thread.run_sync(
                    lambda: span(inputs.hidden, inputs.position_ids, None, inputs.attention_mask).detach().cpu())
            return await remote_forward(node, info, start, end, inputs.hidden, inputs.position_ids,
                                        inputs.attention_mask, lora=self.lora, timeout=60)

        return SpotChecker(self.verify, lambda: table.servers(model_id), execute, shadow, local=local,
                           wire_error=COMPRESSION_ERROR[self.compression], record_to=caught_path(),
                           banish=self.bans.convict)

    def use_speculation(self, mode: str | int = "auto", draft: str | None = None) -> None:
        """Speculative decoding in sessions opened from now on: `mode` is off, auto or drafts per pass;
        `draft` names a small local model of the same tokenizer (default: prompt lookup, no model).
        Greedy output is unchanged token for token; sampled output keeps its distribution."""
        self.speculate = parse_speculate(mode)
        self.draft = load_draft(draft, self.head.embedding_layer().num_embeddings) if draft else None

    def use_adapter(self, adapter: str | Path | None) -> None:
        """Apply an adapter to sessions opened from now on: a folder written by `mesh finetune` (prompt or
        LoRA), or the name of one the servers host (`mesh serve --adapter`). None removes it."""
        self.lora, self.prefix, self.accept = None, None, self._base_accept
        if adapter is None:
            return
        path = Path(adapter)
        if not path.is_dir():  # hosted: only servers announcing it may serve this client
            name, base = str(adapter), self._base_accept
            self.lora = ClientLora(name)
            self.accept = lambda s: name in s.adapters and base(s)
            return
        from .tuning import Adapter

        loaded = Adapter.load(path, self.config)
        if loaded.deep is not None:
            raise BadRequest("deep-prompt adapters apply to training passes, not to generation",
                             hint="use a prompt or lora adapter for chat")
        weights = loaded.lora_weights()
        if weights is not None:
            self.lora = ClientLora.carrying(weights)
        else:
            self.prefix = loaded.prompt.detach()

    @classmethod
    def from_pretrained(cls, name: str, initial_peers: Sequence[str] | None = None, *,
                        device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
                        compression: str = "none", timeout: float = 30.0, route_wait: float = 30.0,
                        exact: bool = False, cache_dir: Path | None = None,
                        swarm_key: Path | str | None = None, verify: float | None = None
                        ) -> "DistributedModelForCausalLM":
        """Load the client-side parts of `name` on `device` (auto: CUDA, then MPS, then CPU; dtype None: the
        device's default, float32 with `exact`) and join the swarm through `initial_peers` (default:
        $MESH_INITIAL_PEERS); waits up to `timeout` s until every block has a server. `swarm_key`: a private
        swarm's key file (default: $MESH_SWARM_KEY; none: the open swarm). `verify`: the fraction of steps
        spot-checked on independent servers (default: $MESH_VERIFY, else 0.02 on the open swarm and 0 in a
        private one)."""
        if exact and dtype in (None, "auto"):  # exact servers are float32: so is the head of an exact client
            dtype = torch.float32
        where, key = Device.choose(device, dtype), swarm_key_from(swarm_key)  # bad options fail before loading
        rate = verify_rate(verify, private=key is not None)
        source = resolve_model(name, cache_dir)
        head = load_head(source, where.dtype, where.torch)
        tokenizer = _tokenizer_or_none(source)
        peers = list(initial_peers or env_initial_peers())
        if not peers:
            raise MeshError("no peers to join", hint="pass initial_peers (printed by `mesh serve`)")
        # a listening port lets DCUtR punch through this client's NAT to servers that sit behind NATs too
        client = SwarmClient(NodeConfig(listen=[CLIENT_LISTEN], initial_peers=peers, dht_mode="client",
                                        swarm_key=key))
        model = cls(source, head, tokenizer, client, compression, route_wait, exact)
        model.verify = rate
        try:
            model.wait_for_swarm(timeout)
        except BaseException:
            client.close()
            raise
        return model

    @property
    def num_blocks(self) -> int:
        return self.source.num_blocks

    @property
    def config(self):
        return self.source.config

    def wait_for_swarm(self, timeout: float) -> None:
        model_id, n = self.source.model_id, self.num_blocks
        swarm = self.client.swarm

        async def wait() -> bool:
            await swarm.discover(model_id, timeout=min(timeout, 10))
            return await swarm.wait_for(lambda t: min(t.coverage(model_id, n, self.accept)) > 0, timeout)

        if not self.client.call(wait):
            counts = swarm.table.coverage(model_id, n, self.accept)
            missing = [b for b, c in enumerate(counts) if c == 0]
            raise MeshError(f"blocks {block_ranges(missing)} of {model_id} have no server (waited {timeout:.0f} s)",
                            hint="start servers with `mesh serve`, or check --initial-peers")

    def inference_session(self, max_length: int = 1024, batch_size: int = 1) -> SwarmSession:
        return SwarmSession(self, max_length, batch_size)

    def sampling(self, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, stop_strings: Sequence[str] = ()) -> SamplingConfig:
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        return SamplingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, eos_token_ids=eos,
                              stop_strings=tuple(stop_strings),
                              pad_token_id=self.tokenizer.pad_token_id if self.tokenizer is not None else None)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               session: SwarmSession | None = None, **sampling) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens [batch] as they are sampled."""
        config = self.sampling(**sampling)
        own = session is None
        if own:
            session = self.inference_session(input_ids.shape[1] + config.max_new_tokens, input_ids.shape[0])
        try:
            yield from session.generator.stream(input_ids, attention_mask, config)
        finally:
            if own:
                session.close()

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 session: SwarmSession | None = None, on_token: Callable[[torch.Tensor], None] | None = None,
                 **sampling) -> torch.Tensor:
        """Like transformers' generate(): the input followed by the new tokens, [batch, length].
        In a session, the result holds every token of the session so far."""
        own = session is None
        config = self.sampling(**sampling)
        if own:
            session = self.inference_session(input_ids.shape[1] + config.max_new_tokens, input_ids.shape[0])
        try:
            session.generator.generate(input_ids, attention_mask, config, on_token)
            return session.generator.ids.clone()
        finally:
            if own:
                session.close()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "DistributedModelForCausalLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CLIENT_LISTEN = "/ip4/0.0.0.0/tcp/0"


def _tokenizer_or_none(source: ModelSource):
    """Models without tokenizer files still generate from token ids."""
    try:
        return load_tokenizer(source)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer for %s (%s): token ids only", source.name, str(e).splitlines()[0])
        return None
