"""Read only the tensors a span (or the client head) needs from safetensors checkpoints.

Tensors are read by name through `safe_open`, so a server hosting 10 blocks of a 70B model touches only
those blocks' bytes, never the whole checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .errors import ModelLoadError

__all__ = ["Checkpoint", "find_prefix", "read_block"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
Fetch = Callable[[list[str]], None]  # makes the named files of a checkpoint's folder present


@dataclass
class Checkpoint:
    """The tensor names of a safetensors checkpoint and the file holding each."""

    folder: Path
    files: dict[str, str] = field(default_factory=dict)  # tensor name -> file name
    bytes_read: int = 0  # what this object materialised so far (memory accounting, tests)
    fetch: Fetch | None = None  # brings missing files into `folder` (a hub model's shards, on first use)

    @classmethod
    def open(cls, folder: Path, fetch: Fetch | None = None) -> "Checkpoint":
        """A checkpoint in `folder`. With `fetch`, weight files may be absent: only those holding the
        tensors read are fetched, so a server of 10 blocks of a 70B model downloads ~1/8 of it."""
        folder = Path(folder)
        index = folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls(folder, dict(weight_map), fetch=fetch)
        single = folder / SINGLE
        if not single.exists() and fetch is not None:
            fetch([SINGLE])
        if not single.exists():
            raise ModelLoadError(f"no safetensors weights in {folder}",
                                 hint=f"expected {SINGLE} or {INDEX}")
        with safe_open(str(single), framework="pt") as f:
            return cls(folder, {name: SINGLE for name in f.keys()}, fetch=fetch)

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self.files if n.startswith(prefix)]

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read the named tensors (grouped by file), cast floating ones to `dtype`."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        missing = sorted(f for f in by_file if not (self.folder / f).exists())
        if missing and self.fetch is not None:
            self.fetch(missing)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as f:
                for name in file_names:
                    t = f.get_tensor(name)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[name] = t
                    self.bytes_read += t.numel() * t.element_size()
        return out


def find_prefix(ckpt: Checkpoint, templates: tuple[str, ...], i: int | None = None) -> str:
    """The first prefix template (formatted with block i) that names any tensor of the checkpoint."""
    for template in templates:
        prefix = template.format(i=i) if i is not None else template
        if ckpt.names_with_prefix(prefix):
            return prefix
    raise ModelLoadError(f"checkpoint in {ckpt.folder} has no tensors for "
                         f"{templates[0].format(i=i) if i is not None else templates[0]}")


def read_block(ckpt: Checkpoint, templates: tuple[str, ...], i: int,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """State dict of block i, keys relative to the block."""
    prefix = find_prefix(ckpt, templates, i)
    names = ckpt.names_with_prefix(prefix)
    return {n[len(prefix):]: t for n, t in ckpt.read(names, dtype).items()}
