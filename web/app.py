"""`mesh api`: the OpenAI-compatible HTTP API of a swarm client, in the client node's own trio loop.

Each request opens its own inference session (servers batch the concurrent ones), streams tokens as
server-sent events or returns them whole, and closes the session when the answer ends or when the client
goes away: Starlette cancels a streaming response whose client disconnected, and the cancellation closes
the session's streams to every server at once.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import deque
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

import torch
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..api.aio import open_async_session
from ..model.chat import TextStream, encode_messages, encode_text, has_chat_template
from ..model.errors import MeshError
from ..model.generation import SamplingConfig
from ..net.report import swarm_report
from .dashboard import Snapshots, dashboard_routes
from .openai import (DEFAULT_MAX_TOKENS, MAX_BODY, ApiError, CompletionRequest, StopText, chunk_body,
                     completion_body, error_body, new_id, parse_request, usage_body)
from .server import serve_http

if TYPE_CHECKING:
    from ..api import DistributedModelForCausalLM

__all__ = ["RequestRecord", "RequestLog", "Completions", "api_app"]

log = logging.getLogger("mesh.api.http")


@dataclass
class RequestRecord:
    """One served request, for the request log and the dashboard."""

    time: float
    endpoint: str
    model: str
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0
    first_token_s: float | None = None
    route: str = ""
    status: int = 200
    finish: str = ""
    received: float = field(default_factory=time.perf_counter, repr=False)  # the clock when it arrived

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_out / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        out = dict(asdict(self), tokens_per_s=round(self.tokens_per_s, 2))
        del out["received"]
        return out


class RequestLog:
    """The last requests this API served (a bounded window: the dashboard's "recent requests")."""

    def __init__(self, keep: int = 100) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=keep)

    def add(self, record: RequestRecord) -> None:
        self._records.append(record)
        log.info("%s %s model=%s tokens in=%d out=%d %.2f s (%.1f tokens/s) finish=%s route=%s", record.status,
                 record.endpoint, record.model, record.tokens_in, record.tokens_out, record.seconds,
                 record.tokens_per_s, record.finish or "-", record.route or "-")

    def recent(self) -> list[dict]:
        return [r.to_json() for r in reversed(self._records)]


class Completions:
    """Answers checked requests through the swarm, one inference session each."""

    def __init__(self, model: "DistributedModelForCausalLM", names: set[str], max_concurrent: int = 16) -> None:
        self.model = model
        self.names = names  # what requests may call the model
        self.max_concurrent = max_concurrent
        self.active = 0
        self.requests = RequestLog()
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)

    def check(self, req: CompletionRequest) -> None:
        if req.model not in self.names:
            raise self.unknown(req.model)
        table, model = self.model.client.swarm.table, self.model
        if min(table.coverage(model.source.model_id, model.num_blocks, model.accept)) == 0:
            raise ApiError(503, "some blocks of the model have no server in the swarm right now",
                           code="swarm_unavailable", kind="server_error")
        if self.active >= self.max_concurrent:
            raise ApiError(429, f"{self.active} requests are in flight, the most this API runs at once",
                           code="too_many_requests", kind="rate_limit_error")

    def unknown(self, name: str) -> ApiError:
        return ApiError(404, f"the model {name!r} does not exist here; this API serves "
                        f"{', '.join(sorted(self.names))}", param="model", code="model_not_found")

    def encode(self, req: CompletionRequest) -> torch.Tensor:
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: text requests cannot be encoded")
        if req.chat:
            if not has_chat_template(tokenizer):
                raise ApiError(400, "this model has no chat template: use /v1/completions", code="no_chat_template")
            try:
                return encode_messages(tokenizer, list(req.messages))
            except Exception as e:  # the template's own checks (roles out of order, a role it lacks)
                raise ApiError(400, f"the model's chat template rejected the messages: {e}", param="messages",
                               code="invalid_messages") from None
        return encode_text(tokenizer, req.prompt)

    def sampling(self, req: CompletionRequest, prompt_tokens: int) -> SamplingConfig:
        room = self.context - prompt_tokens
        wanted = req.max_tokens if req.max_tokens is not None else min(DEFAULT_MAX_TOKENS, room)
        if wanted > room or room < 1:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) and max_tokens ({wanted}) exceed the model's "
                           f"context of {self.context} tokens", param="max_tokens", code="context_length_exceeded")
        config = self.model.sampling(max_new_tokens=wanted, do_sample=not req.greedy,
                                     temperature=req.temperature or 1.0, top_p=req.top_p, stop_strings=req.stop)
        config.seed = req.seed
        return config

    async def text(self, ids: torch.Tensor, config: SamplingConfig, stops: tuple[str, ...],
                   record: RequestRecord) -> AsyncIterator[str]:
        """The answer's text in pieces safe to send; `record` learns the route, counts, times (from the
        request's arrival) and finish reason."""
        pieces, cut = TextStream(self.model.tokenizer), StopText(stops)
        eos = set(config.eos_token_ids)
        record.finish = "length"
        self.active += 1
        try:
            async with open_async_session(self.model, ids.shape[1] + config.max_new_tokens) as session:
                record.route = session.describe()
                async with aclosing(session.stream(ids, None, config)) as tokens:
                    async for token in tokens:
                        token_id = int(token[0])
                        record.tokens_out += 1
                        if record.first_token_s is None:
                            record.first_token_s = time.perf_counter() - record.received
                        if token_id in eos:
                            record.finish = "stop"
                        piece = cut.push(pieces.push(token_id))
                        if piece:
                            yield piece
                        if cut.stopped:
                            record.finish = "stop"
                            break
            rest = cut.flush()
            if rest:
                yield rest
        finally:
            self.active -= 1
            record.seconds = time.perf_counter() - record.received


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY} bytes", code="body_too_large")
    return bytes(body)


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def _complete(service: Completions, request: Request, chat: bool) -> Response:
    endpoint = request.url.path
    record = RequestRecord(time=time.time(), endpoint=endpoint, model="?")
    try:
        req = parse_request(await _read_body(request), chat)
        record.model = req.model
        service.check(req)
        ids = service.encode(req)
        record.tokens_in = int(ids.shape[1])
        config = service.sampling(req, record.tokens_in)
    except ApiError as e:
        record.status, record.finish = e.status, e.code or e.kind
        service.requests.add(record)
        raise
    rid = new_id(chat)
    if req.stream:
        return StreamingResponse(_events(service, req, rid, ids, config, record), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        text = "".join([piece async for piece in service.text(ids, config, req.stop, record)])
    except MeshError as e:
        record.status, record.finish = 503, "error"
        raise ApiError(503, f"the swarm could not answer: {e}", code="swarm_error", kind="server_error") from None
    except BaseException as e:
        record.status, record.finish = (499, "client closed") if _cancelled(e) else (500, "error")
        raise
    finally:
        service.requests.add(record)
    return JSONResponse(completion_body(req, rid, text, record.finish,
                                        usage_body(record.tokens_in, record.tokens_out)))


async def _events(service: Completions, req: CompletionRequest, rid: str, ids: torch.Tensor,
                  config: SamplingConfig, record: RequestRecord) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer; cancelled (and its session closed) if the client leaves."""
    try:
        if req.chat:
            yield _sse(chunk_body(req, rid, "", first=True))
        async with aclosing(service.text(ids, config, req.stop, record)) as pieces:
            async for piece in pieces:
                yield _sse(chunk_body(req, rid, piece))
        yield _sse(chunk_body(req, rid, None, finish=record.finish))
        if req.include_usage:
            yield _sse(chunk_body(req, rid, None, usage=usage_body(record.tokens_in, record.tokens_out)))
        yield _sse("[DONE]")
    except MeshError as e:
        record.status, record.finish = 503, "error"
        yield _sse(error_body(ApiError(503, f"the swarm could not answer: {e}", code="swarm_error",
                                       kind="server_error")))
    except BaseException as e:
        record.status, record.finish = (499, "client closed") if _cancelled(e) else (500, "error")
        raise
    finally:
        service.requests.add(record)


def _cancelled(e: BaseException) -> bool:
    """Whether `e` is only the cancellation of a response whose client went away (maybe in a group)."""
    if isinstance(e, BaseExceptionGroup):
        return e.split((trio.Cancelled, GeneratorExit))[1] is None
    return isinstance(e, (trio.Cancelled, GeneratorExit))


def _authorized(request: Request, api_key: str | None) -> bool:
    if api_key is None:
        return True
    given = request.headers.get("authorization", "")
    return secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode())


def api_app(service: Completions, api_key: str | None = None, extra_routes: list[BaseRoute] = (),
            ) -> Starlette:
    """The OpenAI routes (/v1/...) over `service`, plus `extra_routes` (the dashboard)."""

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                if not _authorized(request, api_key):
                    raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                   code="invalid_api_key")
                return await handler(request)
            except ApiError as e:
                return JSONResponse(error_body(e), status_code=e.status)
        return endpoint

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(n) for n in sorted(service.names)]})

    async def one_model(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in service.names:
            raise service.unknown(name)
        return JSONResponse(_model_card(name))

    async def chat(request: Request) -> Response:
        return await _complete(service, request, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(service, request, chat=False)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(error_body(ApiError(exc.status_code, str(exc.detail))), status_code=exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(ApiError(500, "the server failed on this request (its log says why)",
                                                kind="server_error")), status_code=500)

    routes = [Route("/v1/models", guarded(models)), Route("/v1/models/{name:path}", guarded(one_model)),
              Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
              Route("/v1/completions", guarded(completions), methods=["POST"]), *extra_routes]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "mesh"}


async def serve_api(model: "DistributedModelForCausalLM", names: set[str], host: str, port: int, *,
                    api_key: str | None = None, max_concurrent: int = 16,
                    on_ready: Callable[[str], None] = lambda url: None) -> None:
    """Serve the API (and the dashboard at /) from the trio loop running `model`'s client node, until
    cancelled. `on_ready` gets the base URL once the socket listens."""
    service = Completions(model, names, max_concurrent)
    swarm, model_id = model.client.swarm, model.source.model_id

    async def snapshot() -> dict:
        report = await swarm_report(swarm, model_id, rtt_timeout=1.0)
        return dict(report, requests=service.requests.recent(),
                    node={"peer_id": str(swarm.node.peer_id), "role": "api"})

    app = api_app(service, api_key, dashboard_routes(Snapshots(snapshot), f"mesh · {model.source.name}"))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_http, app, host, port)
        on_ready(url)
