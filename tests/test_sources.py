"""Model sources: folders (single and sharded), the embedded default, hub names, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from mesh.model.errors import ModelLoadError, ModelNotFound
from mesh.model.local import split_evenly
from mesh.model.sources import WELL_KNOWN, resolve_model
from mesh.model.span import load_span

from conftest import make_tiny
from ggufwrite import ARCHITECTURES as GGUF_ARCHITECTURES

MESH = [sys.executable, "-m", "mesh.cli"]


def run_mesh(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*MESH, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_split_evenly_covers_all_blocks():
    for n in (1, 5, 30, 80):
        for parts in (1, 2, 3, 7, 100):
            ranges = split_evenly(n, parts)
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a < b for a, b in ranges)
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_sharded_folder_loads_span(tmp_path):
    model = make_tiny("llama", layers=4)
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    source = resolve_model(str(tmp_path))
    assert source.num_blocks == 4
    span = load_span(source.path, source.config, 1, 3)
    for mine, ref in zip(span.layers, model.model.layers[1:3]):
        for (n1, p1), (n2, p2) in zip(mine.state_dict().items(), ref.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2)


def test_smollm2_resolves_to_cached_folder(smollm2):
    assert smollm2.num_blocks == 30
    assert smollm2.config.model_type == "llama"
    assert (smollm2.path / "model.safetensors").exists()
    again = resolve_model("smollm2", cache_dir=smollm2.path.parent.parent, progress=False)
    assert again.path == smollm2.path  # converted once, reused


def test_well_known_names_map_to_hub_repos():
    assert WELL_KNOWN["llama-2-70b"] == "meta-llama/Llama-2-70b-hf"
    assert WELL_KNOWN["bloom"] == "bigscience/bloom"
    assert WELL_KNOWN["mixtral-8x7b"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert WELL_KNOWN["qwen2.5-72b"] == "Qwen/Qwen2.5-72B-Instruct"
    assert WELL_KNOWN["gemma-2-27b"] == "google/gemma-2-27b-it"
    assert WELL_KNOWN["falcon-40b"] == "tiiuae/falcon-40b-instruct"
    assert all(k == k.lower() and v.count("/") == 1 for k, v in WELL_KNOWN.items())
    started = time.monotonic()
    with pytest.raises(ModelNotFound) as err:
        resolve_model("llama-2-70b")  # offline here: must fail fast and name the repository
    assert time.monotonic() - started < 30
    assert "meta-llama/Llama-2-70b-hf" in err.value.one_line()


def gguf_model(arch: str):
    """A tiny model of `arch` whose config a GGUF file carries whole (Qwen3's head size and Gemma 3's layer
    pattern are not in transformers' GGUF mapping: their defaults are used)."""
    import transformers as tf

    if arch == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=6, num_attention_heads=4,
                                                  num_key_value_heads=2)).eval()
    if arch == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                        num_hidden_layers=6, num_attention_heads=4,
                                                        num_key_value_heads=2, head_dim=16,
                                                        sliding_window=4)).eval()
    return make_tiny(arch)


@pytest.fixture(scope="module")
def gguf_tokenizer():
    from ggufwrite import tokenizer_metadata
    from mesh.model.sources import _smollm2_gguf

    return tokenizer_metadata(_smollm2_gguf(), 128)


@pytest.mark.parametrize("arch", GGUF_ARCHITECTURES)
def test_a_gguf_file_of_each_family_serves_the_same_model(arch, gguf_tokenizer, tmp_path):
    """Written as llama.cpp lays the family out, converted once by `resolve_model`, read back by mesh's head
    and span: the logits equal the original model's (SmolLM2 covers Llama)."""
    from ggufwrite import write_gguf
    from mesh.model.head import load_head

    torch.manual_seed(0)
    model = gguf_model(arch)
    path = write_gguf(model, arch, tmp_path / f"{arch}.gguf", gguf_tokenizer)
    source = resolve_model(str(path), cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "cache" / "models").is_dir() and source.config.model_type.startswith(arch)
    head, span = load_head(source), load_span(source.path, source.config, 0, source.num_blocks)
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = head.logits(span(head.embed(ids), torch.arange(12).expand(2, 12)))
        assert torch.allclose(ours, model(ids).logits, atol=1e-5)


def test_errors_are_typed(tmp_path):
    with pytest.raises(ModelNotFound):
        resolve_model("surely-not-a-model")
    with pytest.raises(ModelNotFound):
        resolve_model(str(tmp_path / "missing"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    with pytest.raises(ModelLoadError):
        resolve_model(str(bad), cache_dir=tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache" / "models").iterdir())  # nothing half-written left behind


@pytest.mark.parametrize("ref, says", [
    ("surely-not-a-model", "unknown model"),
    ("/definitely/missing/folder", "no model folder"),
    ("CORRUPT", "cannot read GGUF"),
    ("llama-2-70b", "meta-llama/Llama-2-70b-hf"),
])
def test_cli_gives_one_line_error(tmp_path, monkeypatch, ref, says):
    """In-process (typer's runner): what is checked is the command's own output and exit code."""
    from typer.testing import CliRunner

    from mesh.cli.main import app

    if ref == "CORRUPT":
        ref = str(tmp_path / "corrupt.gguf")
        (tmp_path / "corrupt.gguf").write_bytes(b"not a gguf at all")
    monkeypatch.setenv("MESH_CACHE", str(tmp_path / "cache"))
    t0 = time.monotonic()
    result = CliRunner().invoke(app, ["generate", ref, "-p", "hi", "--local"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr
    assert time.monotonic() - t0 < 30  # offline, a hub name fails within seconds, never hangs


@pytest.mark.slow
def test_cli_local_generate_matches_transformers(smollm2, smollm2_model, mesh_cache):
    from mesh.model.chat import encode_messages
    from mesh.model.head import load_tokenizer

    prompt = "Name three colours."
    result = run_mesh("generate", "smollm2", "-p", prompt, "--local", "-n", "12",
                      env={"MESH_CACHE": str(mesh_cache)})
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer(smollm2)
    ids = encode_messages(tok, [{"role": "user", "content": prompt}])
    out = smollm2_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert result.stdout.strip() == expected.strip()
    assert "drafts accepted" in result.stderr  # speculative by default, and still transformers' tokens
