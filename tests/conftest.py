"""Shared fixtures: tiny random models saved as Hugging Face folders, and the embedded SmolLM2.

The suite is hermetic: its model cache, throughput cache, identities and Hugging Face home live under
pytest's temporary folder (set in the environment before any test starts, so every `mesh` process the
tests start inherits them), never under ~/.cache/mesh or ~/.config/mesh.
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Callable

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


TINY_KINDS = ("llama", "llama3", "bloom", "qwen2", "qwen3", "mistral", "mixtral", "phi3", "gemma2", "gemma3",
              "falcon", "falcon40", "falcon_rw")
SLIDING_WINDOW = 4  # Gemma's and Mistral's tiny window, shorter than the prompts the tests use


def make_tiny(kind: str, layers: int = 6, seed: int = 0):
    """A tiny random model of the given architecture (fast to build, exact to compare)."""
    import transformers as tf

    torch.manual_seed(seed)
    plain = dict(vocab_size=128, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    decoder = dict(plain, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512)
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**decoder))
    elif kind == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**decoder, rope_parameters=rope, tie_word_embeddings=True))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**decoder, head_dim=16))
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**decoder, sliding_window=SLIDING_WINDOW))
    elif kind == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**decoder, num_local_experts=4, num_experts_per_tok=2,
                                                       sliding_window=None))
    elif kind == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**decoder))
    elif kind == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**decoder, head_dim=16, sliding_window=SLIDING_WINDOW,
                                                     layer_types=alternating))
    elif kind == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**decoder, head_dim=16, sliding_window=SLIDING_WINDOW,
                                                         layer_types=alternating))
    elif kind == "falcon":
        cfg = tf.FalconConfig(**plain, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                              new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False,
                              bias=False)
        model = tf.FalconForCausalLM(cfg)
    elif kind == "falcon40":  # Falcon-40B's layout: grouped KV heads, two layer norms in parallel
        cfg = tf.FalconConfig(**plain, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                              num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True, alibi=False,
                              bias=False)
        model = tf.FalconForCausalLM(cfg)
    elif kind == "falcon_rw":  # Falcon-RW: ALiBi, sequential attention and MLP, a KV head per query head
        cfg = tf.FalconConfig(**plain, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                              new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True,
                              bias=True)
        model = tf.FalconForCausalLM(cfg)
    elif kind == "gemma3_vision":  # multimodal: mesh serves its text part
        text = dict(decoder, head_dim=16, sliding_window=SLIDING_WINDOW, layer_types=alternating)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=16, patch_size=4)
        cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                              image_token_index=127, boi_token_index=125, eoi_token_index=126)
        model = tf.Gemma3ForConditionalGeneration(cfg)
    elif kind == "bloom":
        model = tf.BloomForCausalLM(tf.BloomConfig(**plain, hidden_size=64, n_layer=layers, n_head=4))
    else:
        raise ValueError(kind)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def hermetic_home(tmp_path_factory) -> Path:
    """Point every cache and identity of mesh (and Hugging Face) at this session's temporary folder, and
    leave spot checks to the tests that ask for them."""
    root = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("MESH_CACHE", "MESH_HOME", "HF_HOME", "MESH_VERIFY")}
    os.environ.update(MESH_CACHE=str(root / "cache"), MESH_HOME=str(root / "config"), HF_HOME=str(root / "hf"))
    # Spot checks run where a test asks for them (test_e2e_verify, test_e2e_quant, test_verify); elsewhere
    # they would re-run every answer on the swarm's replicas and cost the suite about a tenth of its time.
    os.environ["MESH_VERIFY"] = "0"
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def mesh_cache(hermetic_home) -> Path:
    """Model cache shared by the session (SmolLM2 is converted into it once per run)."""
    return Path(os.environ["MESH_CACHE"])


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models of each supported architecture saved as safetensors folders."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind in TINY_KINDS:
        model = make_tiny(kind)
        model.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="session")
def tiny30(tmp_path_factory):
    """A tiny random Llama with 30 blocks (SmolLM2's count), for swarms of `mesh serve` processes."""
    folder = tmp_path_factory.mktemp("tiny30") / "tiny30"
    make_tiny("llama", layers=30).save_pretrained(folder)
    return folder


# Groups of server processes shared by several modules. Their users run one after another (the
# collection is reordered) and each group is stopped right after its last user: idle servers still
# gossip, and a dozen of them would take a core from every test that runs beside them.
SHARED = ("pool", "smol_swarm", "victims")
_stoppers: dict[str, Callable[[], None]] = {}
_last_users = pytest.StashKey[dict]()


def pytest_collection_modifyitems(config, items) -> None:
    def group(item) -> int:
        return next((i + 1 for i, name in enumerate(SHARED) if name in item.fixturenames), 0)

    items.sort(key=group)  # stable: module order is kept within a group
    config.stash[_last_users] = {name: item.nodeid for item in items for name in SHARED if name in item.fixturenames}


def pytest_runtest_teardown(item, nextitem) -> None:
    for name, nodeid in item.config.stash.get(_last_users, {}).items():
        if nodeid == item.nodeid and name in _stoppers:
            _stoppers.pop(name)()


@pytest.fixture(scope="session")
def pool(tiny30, tmp_path_factory):
    """Two `mesh serve` processes per span of tiny30 for every e2e module; a test that kills some calls
    `refill()` first, which replaces only the dead ones."""
    from procs import Pool

    pool = Pool(tiny30, tmp_path_factory.mktemp("logs"))
    _stoppers["pool"] = pool.cleanup
    try:
        pool.refill()
        yield pool
    finally:
        _stoppers.pop("pool", None)
        pool.cleanup()


@pytest.fixture(scope="session")
def victims(tiny_dirs, tmp_path_factory):
    """Two `mesh serve` processes (blocks 0:3 and 3:6 of the tiny Llama) that tests/adversarial attacks."""
    from hostile import Victims

    victims = Victims(tiny_dirs["llama"], tmp_path_factory.mktemp("victim-logs"))
    _stoppers["victims"] = victims.cleanup
    try:
        yield victims
    finally:
        _stoppers.pop("victims", None)
        victims.cleanup()


@pytest.fixture(scope="session")
def smollm2(mesh_cache):
    from mesh.model.sources import resolve_model

    return resolve_model("smollm2", cache_dir=mesh_cache, progress=False)


@pytest.fixture(scope="session")
def smol_swarm(smollm2, tmp_path_factory):
    """Two `mesh serve` processes for each third of SmolLM2 (so one may die), shared by the e2e modules
    that need the real model; a test that kills one respawns it."""
    from mesh.cli.localswarm import LocalSwarm

    with LocalSwarm("smollm2", 30, servers=3, replicas=2, log_dir=tmp_path_factory.mktemp("smol-logs")) as s:
        _stoppers["smol_swarm"] = s.stop
        yield s
        _stoppers.pop("smol_swarm", None)


@pytest.fixture(scope="session")
def smollm2_model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2.path), dtype=torch.float32).eval()


LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@asynccontextmanager
async def running_nodes(n: int, **kwargs):
    """n libp2p nodes on loopback; entered and left in the calling task, as trio requires."""
    from mesh.net.node import NodeConfig, open_node

    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_node(NodeConfig(listen=LOOPBACK, **kwargs)))
               for _ in range(n)]


NEAR_TIE = 0.1  # top-2 logit gap below which a lossy codec may pick the other token (bench/compression.py)


def assert_greedy_equal_but_near_ties(model, prompt: torch.Tensor, mine: list[int], ref: list[int],
                                      near_tie: float = NEAR_TIE) -> None:
    """`mine` equals the exact greedy tokens `ref`, or first differs where the exact model's top-2 logits
    are within `near_tie` (a near tie no lossy code of hidden states can be expected to keep)."""
    n = min(len(mine), len(ref))
    k = next((i for i in range(n) if mine[i] != ref[i]), None)
    if k is None:
        assert len(mine) == len(ref), (len(mine), len(ref))
        return
    with torch.no_grad():
        seq = torch.tensor([prompt.tolist()[0] + ref[:k]])
        top2 = model(seq).logits[0, -1].float().topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < near_tie, f"token {k} differs although the exact model's top-2 gap is {gap:.4f}"
    print(f"tokens equal up to {k}, then a near tie (top-2 gap {gap:.4f})")
