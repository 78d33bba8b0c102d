"""Prompt formatting and incremental detokenisation shared by `generate` and `chat`."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["has_chat_template", "encode_messages", "encode_text", "TextStream"]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer can wrap messages (base models cannot: use raw completion)."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> torch.Tensor:
    """Token ids [1, L] of a conversation, ending with the assistant's turn opened."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids [1, T] of plain text, as the tokenizer encodes it by default."""
    return tokenizer(text, return_tensors="pt")["input_ids"]


class TextStream:
    """Turns a growing list of token ids into printable text deltas.

    Decoding token by token breaks multi-byte characters and merged spaces; decoding the whole
    suffix and emitting only what is new and complete (no trailing U+FFFD) does not.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self.emitted:]
        self.emitted = len(text)
        return delta

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
