"""Spans with their own caches give exactly what the same blocks give inside the full model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from mesh.model import compat
from mesh.model.errors import BadRequest, CacheTrimmed, MaxLengthExceeded, SpanOutOfRange
from mesh.model.generation import Generator, LocalSpans, SamplingConfig
from mesh.model.head import load_head
from mesh.model.sources import resolve_model
from mesh.model.span import load_span
from mesh.model.weights import Checkpoint

from conftest import SLIDING_WINDOW, TINY_KINDS

TOL = 1e-5


def thirds(n: int) -> list[tuple[int, int]]:
    a, b = n // 3, 2 * n // 3
    return [(0, a), (a, b), (b, n)]


def load_parts(source):
    spans = [load_span(source.path, source.config, a, b) for a, b in thirds(source.num_blocks)]
    return load_head(source), spans


def reference(source):
    return AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()


def hf_positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def run_spans(head, spans, caches, ids, pos, mask):
    h = head.embed(ids)
    for s, c in zip(spans, caches):
        h = s(h, pos, c, mask)
    return head.logits(h)


def check_prefill_decode(source, model, batch: int):
    head, spans = load_parts(source)
    vocab = source.config.vocab_size
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, 37), generator=g)
    mask = torch.ones(batch, 37, dtype=torch.long)
    if batch > 1:
        mask[1, :5] = 0
        mask[2, :11] = 0
    pos = hf_positions(mask)
    caches = [s.new_cache(batch, 64) for s in spans]
    with torch.no_grad():
        mine = run_spans(head, spans, caches, ids, pos, mask)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        ref, cache = out.logits, out.cache
        worst = (mine - ref)[mask.bool()].abs().max().item()
        full_mask, last = mask, pos[:, -1:]
        steps = []
        for step in range(20):
            new = torch.randint(3, vocab, (batch, 1), generator=g)
            steps.append(new)
            last = last + 1
            full_mask = torch.cat([full_mask, torch.ones(batch, 1, dtype=torch.long)], 1)
            mine = run_spans(head, spans, caches, new, last, None)
            ref = model(input_ids=new, attention_mask=full_mask, position_ids=last, cache=cache,
                        use_cache=True).logits
            worst = max(worst, (mine - ref).abs().max().item())
    assert worst <= TOL, worst
    assert all(c.length == 57 for c in caches)
    # Rollback 8 tokens, re-decode the same tokens: equal to the run without rollback.
    with torch.no_grad():
        for c in caches:
            c.rollback(49)
        last = pos[:, -1:] + 13
        again = None
        for new in steps[12:]:
            again = run_spans(head, spans, caches, new, last, None)
            last = last + 1
    assert (again - mine).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_spans_match_full_model(tiny_dirs, kind, batch):
    source = resolve_model(str(tiny_dirs[kind]))
    check_prefill_decode(source, reference(source), batch)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_smollm2_spans_match_full_model(smollm2, smollm2_model, batch):
    check_prefill_decode(smollm2, smollm2_model, batch)


def greedy_matches(source, model, new_tokens: int, batch: int = 1):
    head, spans = load_parts(source)
    ids = torch.randint(3, source.config.vocab_size, (batch, 12), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :4] = 0
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    gen = Generator(head, LocalSpans(spans, batch, 12 + new_tokens))
    out = gen.generate(ids, mask, SamplingConfig(max_new_tokens=new_tokens))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_greedy_generate_identical(tiny_dirs, kind):
    source = resolve_model(str(tiny_dirs[kind]))
    greedy_matches(source, reference(source), 64, batch=2)


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gemma3"])
def test_windowed_layers_keep_only_their_window(tiny_dirs, kind, monkeypatch):
    """With 2 tokens of rollback slack, a sliding-window layer (window 4) keeps 5 tokens, a global layer all
    of them; greedy tokens still equal transformers' over 40 decode steps with padding, and a rollback
    within the slack works while a deeper one is refused before anything changes."""
    monkeypatch.setattr(compat, "ROLLBACK_SLACK", 2)
    source = resolve_model(str(tiny_dirs[kind]))
    greedy_matches(source, reference(source), 40, batch=2)
    span = load_span(source.path, source.config, 0, 6)
    cache = span.new_cache(1, 64)
    x = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        span(x[:, :20], torch.arange(20)[None], cache)
        kept = {compat.layer_type(source.config, i): layer.keys.shape[-2] for i, layer in enumerate(cache.kv.layers)}
        assert kept.get(compat.SLIDING) == SLIDING_WINDOW - 1 + 2 and kept.get(compat.FULL, 20) == 20
        ahead = span(x[:, 20:22], torch.arange(20, 22)[None], cache)
        cache.rollback(20)  # two tokens: within the slack
        assert torch.equal(span(x[:, 20:22], torch.arange(20, 22)[None], cache), ahead)
        with pytest.raises(CacheTrimmed):
            cache.rollback(10)
        assert cache.length == 22 and all(layer.get_seq_length() == 22 for layer in cache.kv.layers)


def test_multimodal_gemma3_serves_its_text_part(tmp_path):
    """A Gemma 3 checkpoint with a vision tower resolves to its text config; head and spans read only the
    language model's tensors and give what the whole model gives on text."""
    from conftest import make_tiny

    model = make_tiny("gemma3_vision")
    model.save_pretrained(tmp_path)
    source = resolve_model(str(tmp_path))
    assert source.config.model_type == "gemma3_text" and source.num_blocks == 6
    reference = AutoModelForImageTextToText.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    check_prefill_decode(source, reference, 3)
    greedy_matches(source, reference, 8, batch=2)
    ckpt = Checkpoint.open(tmp_path)
    seen = []
    original = Checkpoint.read

    def reading(self, names, dtype=None):
        seen.extend(names)
        return original(self, names, dtype)

    Checkpoint.read = reading
    try:
        load_head(source)
    finally:
        Checkpoint.read = original
    assert seen and not any("vision" in n or "multi_modal" in n for n in seen)
    assert any("vision" in n for n in ckpt.files)


@pytest.mark.slow
def test_smollm2_greedy_64_identical(smollm2, smollm2_model):
    greedy_matches(smollm2, smollm2_model, 64)


def check_backward(source, model):
    head, spans = load_parts(source)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, source.config.vocab_size, (2, 16), generator=g)
    weights = torch.randn(2, 16, source.config.vocab_size, generator=g)
    # Reference: autograd through the full model, gradient at the input of block 0.
    captured = {}
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h

    def grab(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x.retain_grad()
        captured["x"] = x

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, use_cache=False).logits
        (logits * weights).sum().backward()
    finally:
        handle.remove()
    ref = captured["x"].grad
    # Ours: forward through spans keeping each span's input, then span.backward in reverse.
    pos = torch.arange(16)[None].expand(2, 16)
    with torch.no_grad():
        x = head.embed(ids)
        inputs = []
        for s in spans:
            inputs.append(x)
            x = s(x, pos)
    out = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (head.logits(out) * weights).sum().backward()
    grad = out.grad
    for s, x in zip(reversed(spans), reversed(inputs)):
        grad = s.backward(x, grad, pos).hidden
    assert (grad - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_backward_matches_autograd(tiny_dirs, kind):
    source = resolve_model(str(tiny_dirs[kind]))
    check_backward(source, reference(source))


@pytest.mark.slow
def test_smollm2_backward_matches_autograd(smollm2, smollm2_model):
    check_backward(smollm2, smollm2_model)


@pytest.mark.slow
def test_span_loads_only_its_blocks(smollm2):
    ckpt = Checkpoint.open(smollm2.path)
    block_bytes = 0
    from safetensors import safe_open

    with safe_open(str(smollm2.path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if name.startswith("model.layers."):
                shape = f.get_slice(name).get_shape()
                block_bytes += torch.Size(shape).numel() * 4
    from mesh.model import span as span_module

    seen = []
    original = span_module.Checkpoint.open

    def counting_open(folder, fetch=None):
        c = original(folder, fetch)
        seen.append(c)
        return c

    span_module.Checkpoint.open = counting_open
    try:
        span = load_span(smollm2.path, smollm2.config, 10, 20)
    finally:
        span_module.Checkpoint.open = original
    params = sum(p.numel() * p.element_size() for p in span.parameters())
    read = sum(c.bytes_read for c in seen)
    assert read <= 0.40 * block_bytes, (read, block_bytes)
    assert params <= 0.40 * block_bytes
    assert ckpt.bytes_read == 0


def test_a_hub_span_fetches_only_the_shards_it_reads(tmp_path):
    """A hub model resolves to its config and shard index only; a span then fetches the weight files
    that hold its blocks, and nothing else. Here the 'hub' is a local folder the fetch copies from."""
    import shutil

    from conftest import make_tiny

    model = make_tiny("llama", layers=6)
    full = tmp_path / "full"
    model.save_pretrained(full, max_shard_size="60KB")
    shards = sorted(p.name for p in full.glob("model-*.safetensors"))
    assert len(shards) >= 4
    hub = tmp_path / "hub"
    hub.mkdir()
    for name in ("config.json", "model.safetensors.index.json"):
        shutil.copy(full / name, hub / name)
    fetched: list[str] = []

    def fetch(files: list[str]) -> None:
        fetched.extend(files)
        for f in files:
            shutil.copy(full / f, hub / f)

    span = load_span(hub, model.config, 2, 4, fetch=fetch)
    index = Checkpoint.open(full).files
    needed = {index[n] for n in index if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert set(fetched) == needed and len(fetched) == len(set(fetched)) and set(fetched) < set(shards)
    x = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5)[None]
    assert torch.equal(span(x, pos), load_span(full, model.config, 2, 4)(x, pos))


def test_unsupported_families_say_why():
    from transformers import Gemma3Config, GPT2Config

    from mesh.model.compat import family_of
    from mesh.model.errors import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match="multimodal"):
        family_of(Gemma3Config())
    with pytest.raises(UnsupportedArchitecture, match="gpt2") as err:
        family_of(GPT2Config())
    assert "gemma2" in err.value.one_line()


def test_span_errors(tiny_dirs):
    source = resolve_model(str(tiny_dirs["llama"]))
    with pytest.raises(SpanOutOfRange):
        load_span(source.path, source.config, 4, 9)
    span = load_span(source.path, source.config, 0, 2)
    cache = span.new_cache(1, 4)
    h = torch.zeros(1, 3, 64)
    span(h, torch.arange(3)[None], cache)
    with pytest.raises(MaxLengthExceeded):
        span(torch.zeros(1, 2, 64), torch.arange(3, 5)[None], cache)
    assert cache.length == 3  # a refused step leaves the cache untouched
    with pytest.raises(BadRequest):
        span(torch.zeros(1, 1, 65), torch.arange(1)[None], cache)
    with pytest.raises(BadRequest):
        cache.rollback(5)
