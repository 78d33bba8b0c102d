"""Every supported family through a loopback swarm of real processes, against transformers and peft.

Each family's tiny model gets its own swarm: blocks 0:3 and 3:6 on two servers, a spare 3:6, and an int8
0:3 and an nf4 3:6 server. The servers of all families share three processes (tests/multiserve.py), one
per role, so killing the "back" process takes every family's 3:6 server down mid-generation at once.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh import DistributedModelForCausalLM
from mesh.api.tuning import Adapter, SwarmRunner, TuningConfig, adapted_logits, lm_loss
from mesh.model.lora import LoraSpec, LoraWeights, default_targets, target_modules
from mesh.model.span import load_span
from mesh.net.client import remote_forward
from mesh.net.inference import is_exact
from mesh.net.verify import relative_errors, tolerance

from procs import MultiServe, wait_for_servers

pytestmark = pytest.mark.e2e

# the families of the model registry added for Llama 3, Qwen 2.5 (qwen2) and 3, Mixtral, Phi-3, Gemma 2 and
# 3 and Falcon (7B's and 40B's layouts); Llama, Mistral, BLOOM and Falcon-RW are checked at span level
# (test_span.py) and Llama through every other e2e module
FAMILIES = ("llama3", "qwen2", "qwen3", "mixtral", "phi3", "gemma2", "gemma3", "falcon", "falcon40")
PROMPT, NEW_TOKENS, KILL_AT = 10, 16, 6  # the prompt is longer than the tiny sliding window (4)
ROLES = {"back": ("3:6", "none"), "spare": ("3:6", "none"), "int8": ("0:3", "int8"), "nf4": ("3:6", "nf4")}
PROCESS = {"back": "back", "spare": "rest", "int8": "rest", "nf4": "rest"}  # spare and quantized share one


class Swarms:
    """The three processes and, per family, the peer id of each role's server."""

    def __init__(self, tiny_dirs, logs) -> None:
        self.dirs = tiny_dirs
        self.procs: dict[str, MultiServe] = {}
        front = self._start("front", {k: (str(tiny_dirs[k]), "0:3", "none", "") for k in FAMILIES}, logs)
        front.wait_ready_sync(120)
        self.boot = dict(front.addrs)
        for name in ("back", "rest"):
            specs = {f"{k}/{role}": (str(tiny_dirs[k]), *ROLES[role], self.boot[k])
                     for k in FAMILIES for role in ROLES if PROCESS[role] == name}
            self._start(name, specs, logs)
        for p in self.procs.values():
            p.wait_ready_sync(180)

    def _start(self, name, specs, logs) -> MultiServe:
        self.procs[name] = MultiServe(specs, logs / f"{name}.log")
        return self.procs[name]

    def peer(self, kind: str, role: str) -> str:
        addr = self.procs["front"].addrs[kind] if role == "front" else self.procs[PROCESS[role]].addrs[f"{kind}/{role}"]
        return addr.rsplit("/p2p/", 1)[1]

    def cleanup(self) -> None:
        for p in self.procs.values():
            p.cleanup()


@pytest.fixture(scope="module")
def swarms(tiny_dirs, tmp_path_factory):
    s = Swarms(tiny_dirs, tmp_path_factory.mktemp("family-logs"))
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture(scope="module")
def clients(swarms):
    """An exact (float32, unquantized) client per family; the spare is held back until the kill."""
    held_back = {swarms.peer(k, "spare") for k in FAMILIES}
    models = {}
    try:
        for kind in FAMILIES:
            model = models[kind] = DistributedModelForCausalLM.from_pretrained(
                str(swarms.dirs[kind]), [swarms.boot[kind]], exact=True, route_wait=30.0, verify=0.0)
            model.accept = lambda s: is_exact(s) and s.peer_id not in held_back
            assert model.client.call(lambda: wait_for_servers(model, 5))
        yield models, held_back
    finally:
        with ThreadPoolExecutor(len(FAMILIES)) as pool:  # a client node takes a moment to close: all at once
            list(pool.map(lambda m: m.close(), models.values()))


def reference(folder, ids):
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                       pad_token_id=0)
    return out[:, :ids.shape[1] + NEW_TOKENS]


def test_greedy_tokens_equal_transformers_through_a_server_kill(swarms, clients):
    """All families generate at once; when each has its 6th token, the process of their 3:6 servers is
    SIGKILLed and each chain moves to its spare: every output equals transformers' own, token for token."""
    models, held_back = clients
    ids = torch.randint(1, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))

    def kill() -> None:
        held_back.clear()
        swarms.procs["back"].cleanup()

    barrier = threading.Barrier(len(FAMILIES), action=kill, timeout=120)

    def generate(kind: str):
        model, seen = models[kind], [0]

        def on_token(_) -> None:
            seen[0] += 1
            if seen[0] == KILL_AT:
                barrier.wait()

        with model.inference_session(max_length=64) as session:
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, session=session, on_token=on_token)
            return out, session.remote.recoveries

    with ThreadPoolExecutor(len(FAMILIES)) as pool:
        results = dict(zip(FAMILIES, pool.map(generate, FAMILIES)))
    for kind, (out, recoveries) in results.items():
        assert out.tolist() == reference(swarms.dirs[kind], ids).tolist(), kind
        assert recoveries == 1, kind


def peft_grads(folder, adapter_dir, data, targets):
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32),
                                      adapter_dir, is_trainable=True)
    ids, mask, labels = data
    loss, _ = lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    loss.backward()
    base = model.base_model.model
    layers = getattr(getattr(base, "model", None), "layers", None) or base.transformer.h
    names = [n for n, _ in target_modules(layers[0], targets)]
    a = [[layer.get_submodule(n).lora_A["default"].weight.grad for n in names] for layer in layers]
    b = [[layer.get_submodule(n).lora_B["default"].weight.grad for n in names] for layer in layers]
    return loss.detach(), a, b


@pytest.mark.parametrize("kind", FAMILIES)
def test_lora_gradients_through_the_swarm_equal_peft(swarms, clients, kind, tmp_path):
    model = clients[0][kind]
    spec = LoraSpec(rank=4, alpha=8.0, targets=default_targets(model.config))
    adapter = Adapter(model.config, TuningConfig("lora", lora=spec), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B non-zero too, so that every gradient is exercised
        for p in adapter.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    adapter.save(tmp_path / "adapter")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    data = (ids, mask, ids.masked_fill(mask == 0, -100))

    loss, _ = lm_loss(adapted_logits(model.head, SwarmRunner(model), adapter, ids, mask), data[2])
    loss.backward()
    got = LoraWeights.from_tensors(spec, 0, adapter.num_blocks, [p.grad for p in adapter.lora])
    ref_loss, ref_a, ref_b = peft_grads(swarms.dirs[kind], tmp_path / "adapter", data, spec.targets)
    assert torch.allclose(loss.detach(), ref_loss, rtol=1e-5), kind
    for ours, theirs in ((got.a, ref_a), (got.b, ref_b)):
        for mine, ref in zip(sum(ours, []), sum(theirs, [])):
            assert ref.abs().max() > 0
            assert (mine - ref).norm() <= 1e-4 * ref.norm(), (kind, ((mine - ref).norm() / ref.norm()).item())


@pytest.mark.parametrize("kind", FAMILIES)
def test_quantized_spans_stay_within_their_bounds(swarms, clients, kind):
    """The int8 server's 0:3 and the nf4 server's 3:6 against the same blocks in float32 here, on the same
    hidden states: each position's relative error within the tolerance spot checks allow such a server
    (net/verify.py: each kind's largest error on SmolLM2, with margin)."""
    model = clients[0][kind]
    table = model.client.swarm.table
    x = torch.randn(2, PROMPT, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(PROMPT).expand(2, PROMPT)
    source = model.source
    for role, (blocks, mode) in (("int8", ROLES["int8"]), ("nf4", ROLES["nf4"])):
        start, end = map(int, blocks.split(":"))
        info = next(s for s in table.servers(source.model_id) if s.peer_id == swarms.peer(kind, role))
        assert info.quant == mode
        out = model.client.call(lambda: remote_forward(model.client.node, info, start, end, x, pos, timeout=60))
        with torch.no_grad():
            ref = load_span(source.path, source.config, start, end)(x, pos)
        err, bound = relative_errors(out, ref, torch.ones(2, PROMPT)).max().item(), tolerance(info, None, end - start)
        print(f"{kind} {mode} {blocks}: largest relative error {err:.3f} (tolerance {bound:.3f})")
        assert err < bound, (kind, mode, err)
