"""Fine-tuning data: JSON lines checked and tokenized before training, and padded batches.

A row is one of
- `{"text": ...}`: loss on every token;
- `{"prompt": ..., "completion": ...}`: loss on the completion (and the end-of-sequence token) only;
- `{"messages": [{"role", "content"}, ...]}`: the chat template; loss on the assistant turns only.
Every bad row (invalid JSON, not one of those shapes, empty, longer than `max_length` tokens) is reported
with its line number before anything runs; `skip_bad` drops them instead and counts them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadRequest

__all__ = ["IGNORE", "DataError", "Example", "Dataset", "parse_row", "load_jsonl", "collate", "epoch_order"]

IGNORE = -100
MAX_REPORTED = 10


class DataError(BadRequest):
    """A fine-tuning file that cannot be used as it is: unreadable, or bad rows (named by line)."""

    code = "bad_request"


@dataclass
class Example:
    """One tokenized row: its ids and the labels the loss counts (-100 elsewhere)."""

    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is context, not target


@dataclass
class Dataset:
    """The usable rows of a file, and the ones skipped with --skip-bad (line, reason)."""

    examples: list[Example]
    skipped: list[tuple[int, str]]  # (line, why)
    path: Path

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        full = list(tokenizer.apply_chat_template(messages[:i + 1], tokenize=True, return_dict=False))
        if full[:len(ids)] != ids:
            raise ValueError("the chat template does not extend the previous turns")
        new = full[len(ids):]
        ids += new
        labels += new if m["role"] == "assistant" else [IGNORE] * len(new)
    return ids, labels


def parse_row(row: object, tokenizer) -> Example:
    """One JSONL row (text, prompt + completion, or chat messages) as an Example."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ValueError('"messages" must be a non-empty list of {"role", "content"} strings')
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("no assistant turn to learn from")
        ids, labels = _chat_ids(tokenizer, msgs)
    elif "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError('"prompt" and "completion" must both be strings')
        if not completion.strip():
            raise ValueError("empty completion")
        p = _ids(tokenizer, prompt, True)
        c = _ids(tokenizer, completion, False) + eos
        ids, labels = p + c, [IGNORE] * len(p) + c
    elif "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise ValueError('"text" must be a non-empty string')
        ids = _ids(tokenizer, row["text"], True) + eos
        labels = list(ids)
    else:
        raise ValueError('a row needs "text", "prompt" + "completion", or "messages"')
    if sum(x != IGNORE for x in labels) < 1:
        raise ValueError("no tokens to learn from")
    return Example(ids, labels)


def load_jsonl(path: Path, tokenizer, max_length: int, skip_bad: bool = False) -> Dataset:
    """Read and check every row; raise DataError naming the bad lines unless `skip_bad`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    examples, bad = [], []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            bad.append((n, "empty row"))
            continue
        try:
            example = parse_row(json.loads(line), tokenizer)
        except json.JSONDecodeError as e:
            bad.append((n, f"invalid JSON ({e.msg})"))
            continue
        except ValueError as e:
            bad.append((n, str(e)))
            continue
        if len(example.input_ids) > max_length:
            bad.append((n, f"{len(example.input_ids)} tokens, more than --max-length {max_length}"))
            continue
        examples.append(example)
    if bad and not skip_bad:
        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:MAX_REPORTED])
        more = f" (and {len(bad) - MAX_REPORTED} more)" if len(bad) > MAX_REPORTED else ""
        raise DataError(f"{path}: {len(bad)} bad rows: {shown}{more}", hint="fix them, or pass --skip-bad")
    if not examples:
        raise DataError(f"{path} has no usable rows")
    return Dataset(examples, bad, Path(path))


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each [B, longest]."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return ids, mask, labels


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the rows in an epoch: a function of (seed, epoch) only, so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
