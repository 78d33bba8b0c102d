"""The OpenAI wire format: requests parsed and checked into data classes, responses and errors shaped.

Pure functions over JSON values, no I/O: every field of a request is validated here (a body is hostile
until it is), so the app only ever sees a `CompletionRequest` whose numbers are in range.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ApiError", "CompletionRequest", "parse_request", "error_body", "completion_body", "chunk_body",
           "usage_body", "StopText", "MAX_BODY", "MAX_STOPS", "DEFAULT_MAX_TOKENS"]

MAX_BODY = 1 << 20  # bytes of a request body
MAX_MESSAGES = 512
MAX_STOPS = 4  # as OpenAI allows
MAX_STOP_CHARS = 256
DEFAULT_MAX_TOKENS = 256  # when a request names no max_tokens
ROLES = ("system", "developer", "user", "assistant", "tool")
IGNORED_IF_DEFAULT = {"presence_penalty": 0, "frequency_penalty": 0, "n": 1, "logprobs": False, "echo": False,
                      "best_of": 1}


class ApiError(Exception):
    """An error the client gets in OpenAI's shape with HTTP `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/chat/completions or /v1/completions request."""

    chat: bool
    model: str
    messages: tuple[dict[str, str], ...] = ()  # chat
    prompt: str = ""  # completions
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS, capped by the context left
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    user: str = field(default="", compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def parse_request(raw: bytes, chat: bool) -> CompletionRequest:
    """Parse and check a body (ApiError 400 naming the field on anything out of place)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    for name, default in IGNORED_IF_DEFAULT.items():
        if body.get(name, default) not in (default, None):
            raise ApiError(400, f"{name}={body[name]!r} is not supported", param=name, code="unsupported_value")
    model = _str(body, "model", required=True, limit=256)
    if chat:
        content = {"messages": _messages(body.get("messages"))}
    else:
        content = {"prompt": _prompt(body.get("prompt"))}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = None if limit is None else _int(limit, "max_tokens", 1, 1 << 20)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return CompletionRequest(
        chat=chat, model=model, max_tokens=max_tokens, **content,
        temperature=_float(body.get("temperature", 1.0), "temperature", 0.0, 2.0),
        top_p=_float(body.get("top_p", 1.0), "top_p", 0.0, 1.0, low_open=True),
        stop=_stops(body.get("stop")), seed=None if body.get("seed") is None else _int(body["seed"], "seed"),
        stream=_bool(body.get("stream", False), "stream"),
        include_usage=_bool(options.get("include_usage", False), "stream_options.include_usage"),
        user=_str(body, "user", limit=256))


def _str(body: dict, name: str, required: bool = False, limit: int = 1 << 20) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ApiError(400, f"{name} must be a non-empty string of at most {limit} characters", param=name)
    return value


def _int(value: Any, name: str, low: int = -(1 << 63), high: int = (1 << 63) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer in [{low}, {high}], not {value!r}", param=name)
    return value


def _float(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    if not ok or (low_open and value == low):
        raise ApiError(400, f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], not {value!r}",
                       param=name)
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", param=name)
    return value


def _stops(value: Any) -> tuple[str, ...]:
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings",
                       param="stop")
    return tuple(stops)


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_MESSAGES:
        raise ApiError(400, f"messages must be a list of 1 to {MAX_MESSAGES} messages", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role among {', '.join(ROLES)}", param=f"messages[{i}]")
        out.append({"role": "system" if m["role"] == "developer" else m["role"],
                    "content": _content(m.get("content"), f"messages[{i}].content")})
    return tuple(out)


def _content(value: Any, name: str) -> str:
    """A message's text: a string, or a list of text parts (other kinds of part are not supported)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ApiError(400, f"{name} must be a string or a list of text parts", param=name)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise ApiError(400, "prompt must be a string (or a list of one string)", param="prompt")
    return value


def error_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def completion_body(req: CompletionRequest, rid: str, text: str, finish: str, usage: dict) -> dict:
    """A whole (non-streamed) answer."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": int(time.time()),
            "model": req.model, "choices": [choice], "usage": usage}


def chunk_body(req: CompletionRequest, rid: str, text: str | None, finish: str | None = None,
               usage: dict | None = None, first: bool = False) -> dict:
    """One server-sent event of a streamed answer (`usage` alone: the closing usage chunk, no choices)."""
    if usage is not None:
        choices = []
    elif req.chat:
        delta = {"role": "assistant", "content": text or ""} if first else {} if text is None else {"content": text}
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
           "created": int(time.time()), "model": req.model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


class StopText:
    """The answer's text as it grows, cut before the first stop string; what is safe to send so far.

    Text that could still become a stop string is held back until it cannot, so a stream never shows a
    client the beginning of a stop string it would then have to take back."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add decoded text; return the part that can be sent now."""
        if self.stopped:
            return ""
        self.text += delta
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._send(len(self.text))
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._send(len(self.text) - hold)

    def flush(self) -> str:
        """The rest, once no more text comes."""
        return self._send(len(self.text))

    def _send(self, end: int) -> str:
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out
