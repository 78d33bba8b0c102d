"""A tiny transformers model written as a GGUF file (float32 tensors), for the conversion tests.

Metadata keys are the ones transformers' GGUF loader reads for the architecture (its own mapping, read
backwards); tensor names come from the `gguf` package's map, as llama.cpp's converter names them; Gemma's
norm weights are stored plus one, as llama.cpp stores them. The tokenizer is the embedded SmolLM2
file's, cut to the model's vocabulary (`tokenizer_metadata`). Only architectures whose other tensors
llama.cpp stores unchanged are written this way (ARCHITECTURES).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

ARCHITECTURES = ("qwen2", "qwen3", "phi3", "gemma2", "gemma3", "falcon")


Metadata = dict[str, tuple[object, list]]  # key -> (value, GGUF value types)


def tokenizer_metadata(gguf_file: Path, vocab_size: int) -> Metadata:
    """The tokenizer fields of `gguf_file` cut to `vocab_size` tokens, one of them the first merge of two
    kept tokens (a BPE tokenizer that is quick to read)."""
    fields = gguf.GGUFReader(str(gguf_file)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()[:vocab_size - 1]
    merge = next(m for m in fields["tokenizer.ggml.merges"].contents() if all(p in tokens for p in m.split(" ")))
    cut = {"tokenizer.ggml.tokens": tokens + [merge.replace(" ", "")],
           "tokenizer.ggml.token_type": fields["tokenizer.ggml.token_type"].contents()[:vocab_size - 1] + [1],
           "tokenizer.ggml.merges": [merge]}
    return {key: (cut.get(key, field.contents()), field.types) for key, field in fields.items()
            if key.startswith("tokenizer.")}


def write_gguf(model, arch: str, path: Path, tokenizer: Metadata) -> Path:
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    for key, attr in GGUF_CONFIG_MAPPING[arch].items():
        value = getattr(config, attr, None) if attr else None
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            continue
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
    for key, (value, types) in tokenizer.items():
        writer.add_key_value(key, value, types[0], sub_type=types[1] if len(types) > 1 else None)
    names = gguf.get_tensor_name_map(next(e for e, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
