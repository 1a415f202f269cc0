"""The OpenAI-compatible HTTP API (FastAPI) over the engine loop.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /health`` and ``GET /metrics``. Every answer that is not a
success is an OpenAI error object. With an API key, every endpoint but ``/health`` needs
``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..checkpoint.tokenizer import Tokenizer
from ..infer.engine import QueueFullError, Request
from ..infer.generate import SamplingParams
from .chat import ChatTemplate
from .engine_thread import EngineLoop, EngineUnavailable, Event
from .limits import BodyLimit, RequestLimits
from .metrics import Metrics
from .output import LogprobFormatter
from .prompts import check_length, encode_chat, encode_prompts
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, bad_request,
                       check_chat, check_completion, parse, stop_strings)

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


@dataclass
class ServerState:
    """What the handlers need: the engine loop and the model's limits and tokenizer."""

    engine: EngineLoop
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int
    eos_ids: tuple[int, ...]
    chat_template: ChatTemplate
    metrics: Metrics
    api_key: str | None = None
    limits: RequestLimits | None = None  # None: the defaults; resolved for max_model_len
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.limits = (self.limits or RequestLimits()).for_context(self.max_model_len)


# ------------------------------------------------------------------------------- the app
def build_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state``'s model."""
    app = FastAPI(title="skymoe", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.skymoe = state
    # The last added runs first: count, then authenticate, then read the body within limits.
    app.add_middleware(BodyLimit, limits=state.limits)
    app.add_middleware(_AuthAndCount, state=state)

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: HTTPRequest, exc: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                     "server_error").body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.alive:
            raise APIError(503, "the engine is not running", "server_error",
                           code="engine_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        _check_model(state, model)
        return JSONResponse(_model_card(state))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Response:
        arrival = time.perf_counter()
        req = await _off_loop(parse, CompletionRequest, await request.body())
        _check_model(state, req.model)
        check_completion(req, state.vocab_size)
        return await _completion(state, request, req, arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        arrival = time.perf_counter()
        req = await _off_loop(parse, ChatCompletionRequest, await request.body())
        _check_model(state, req.model)
        check_chat(req, state.vocab_size)
        return await _chat(state, request, req, arrival)

    return app


async def _off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a worker thread: parsing and tokenizing a large request must not hold
    the event loop, which answers health checks and streams other clients' tokens."""
    return await anyio.to_thread.run_sync(fn, *args)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "skymoe", "max_model_len": state.max_model_len,
            "vocab_size": state.vocab_size}


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves "
                            f"'{state.model_name}'", "invalid_request_error", "model",
                       "model_not_found")


class _AuthAndCount:
    """ASGI middleware: the API key check (all but /health) and the request counter. Plain
    ASGI rather than BaseHTTPMiddleware, so streaming responses and disconnects pass through
    untouched."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else (
            "/v1/models" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            key = self.state.api_key
            if key and path != "/health" and not _authorized(scope, key):
                err = APIError(401, "missing or wrong API key: send the header "
                                    "'Authorization: Bearer <key>'", "invalid_request_error",
                               None, "invalid_api_key")
                # Closed after the answer: an unread body is not drained for a stranger.
                await JSONResponse(err.body(), status_code=401,
                                   headers={"WWW-Authenticate": "Bearer",
                                            "Connection": "close"})(
                    scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status["code"])).inc()


def _authorized(scope, key: str) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            # Constant-time comparison: the time taken says nothing about the key.
            return scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), key.encode())
    return False


# ------------------------------------------------------------------------- generation
@dataclass
class _Seq:
    """One engine sequence of an HTTP request (a choice)."""

    request: Request
    text: str = ""  # released so far (the engine's incremental, stop-aware text)
    echo: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)


class _Generation:
    """The sequences of one HTTP request, submitted together, and their events."""

    def __init__(self, state: ServerState, seqs: list[_Seq], arrival: float) -> None:
        self.state, self.seqs, self.arrival = state, seqs, arrival
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.open = set(range(len(seqs)))

    async def start(self) -> None:
        try:
            await self.state.engine.submit([s.request for s in self.seqs], self.events,
                                           self.arrival)
        except QueueFullError as exc:
            raise APIError(429, f"the server is busy: {exc}", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineUnavailable as exc:
            raise APIError(503, str(exc), "server_error", code="engine_unavailable") from None
        except ValueError as exc:
            raise bad_request(str(exc)) from None

    async def next(self) -> Event:
        """The next event of any sequence (a failure is raised as a 500)."""
        event = await self.events.get()
        if event.error is not None:
            self.open.clear()
            raise APIError(500, event.error, "server_error", code="generation_failed")
        if event.completion is not None:
            self.open.discard(event.index)
            self.seqs[event.index].finish_reason = event.completion.finish_reason
        if event.token_id is not None:
            self.seqs[event.index].tokens += 1
        return event

    def cancel(self) -> None:
        """Free the slots of the sequences that have not finished (the client is gone)."""
        if self.open:
            self.state.engine.cancel(self.seqs[i].request.request_id for i in self.open)
            self.open.clear()

    async def run_to_end(self, http: HTTPRequest) -> None:
        """Consume every event, cancelling if the client disconnects first."""
        async def consume() -> None:
            while self.open:
                event = await self.next()
                seq = self.seqs[event.index]
                seq.text += event.text
                if event.token_id is not None and event.logprobs is not None:
                    seq.logprobs.append(event.logprobs)

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_disconnected(http.receive))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the handler itself was cancelled (shutdown)
            consumer.cancel()
            self.cancel()
            raise
        finally:
            watcher.cancel()
        if not consumer.done():  # the client went away first
            consumer.cancel()
            self.cancel()
            raise APIError(499, "the client disconnected")
        consumer.result()

    def usage(self, prompts: list[list[int]]) -> dict[str, int]:
        prompt = sum(len(p) for p in prompts)
        completion = sum(s.tokens for s in self.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop, and free the generation's slots, the moment the client
    disconnects: the stream runs beside a task waiting for ``http.disconnect``, which cancels
    it (the generator's ``finally`` then cancels the sequences)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the connection broke while writing
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await _disconnected(receive)
            group.cancel_scope.cancel()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _sampling(state: ServerState, req: CompletionRequest | ChatCompletionRequest,
              prompts: list[list[int]], logprobs: int | None,
              prompt_logprobs: int | None, stop: tuple[str, ...],
              max_tokens: list[int], echo: bool = False) -> list[_Seq]:
    """One engine request per prompt and choice; choice ``i`` samples with ``seed + i``."""
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = max(req.top_k or 0, 0)
    stop_ids = () if req.ignore_eos else state.eos_ids
    stop_ids = tuple(dict.fromkeys(stop_ids + tuple(req.stop_token_ids or ())))
    seqs = []
    for p, ids in enumerate(prompts):
        for i in range(req.n):
            seed = None if req.seed is None else (req.seed + i) % 2**64
            request = Request(list(ids), max_tokens[p], SamplingParams(temperature, top_k, top_p,
                              seed), stop_token_ids=stop_ids, stop=stop,
                              request_id=f"seq-{uuid.uuid4().hex}", logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs)
            seqs.append(_Seq(request, echo=state.tokenizer.decode(ids) if echo else ""))
    return seqs


# --------------------------------------------------------------------------- completions
async def _completion(state: ServerState, http: HTTPRequest, req: CompletionRequest,
                      arrival: float) -> Response:
    prompts = await _off_loop(encode_prompts, state, req.prompt)
    max_tokens = [check_length(state, ids, req.max_tokens, "max_tokens") for ids in prompts]
    prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
    seqs = _sampling(state, req, prompts, req.logprobs, prompt_lp, stop_strings(req),
                     max_tokens, echo=req.echo)
    gen = _Generation(state, seqs, arrival)
    await gen.start()
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    fmt = LogprobFormatter(state.tokenizer)
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}

    def logprobs_of(seq: _Seq, entries, offset: int, with_prompt: bool):
        if req.logprobs is None:
            return None
        pairs = [(lp.token_id, lp) for lp in entries]
        if with_prompt:
            prompt = seq.request.prompt_token_logprobs
            pairs = [(t, lp) for t, lp in zip(seq.request.prompt_ids, prompt)] + pairs
        return fmt.completion(pairs, offset)

    if req.stream:
        offsets = [0] * len(seqs)

        def choice(event, seq: _Seq, text: str) -> dict:
            first = seq.tokens == 1
            if first and seq.echo:
                text = seq.echo + text
            lp = logprobs_of(seq, [event.logprobs] if event.logprobs else [],
                             offsets[event.index], first and req.echo)
            offsets[event.index] += len(text)
            return {"index": event.index, "text": text, "logprobs": lp,
                    "finish_reason": seq.finish_reason}

        return _stream(gen, seqs, head, req, prompts, choice)

    await gen.run_to_end(http)
    choices = []
    for i, seq in enumerate(seqs):
        choices.append({"index": i, "text": seq.echo + seq.text,
                        "logprobs": logprobs_of(seq, seq.logprobs, 0, req.echo),
                        "finish_reason": seq.finish_reason})
    return JSONResponse({**head, "choices": choices, "usage": gen.usage(prompts)})


def _stream(gen: "_Generation", seqs: list[_Seq], head: dict,
            req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
            choice: Callable[..., dict], first_choices: list[dict] | None = None) -> Response:
    """Server-sent events: ``first_choices`` (one chunk each), then one chunk per generated
    token (``choice(event, seq, text)`` builds it), the usage chunk when the request asks for
    it, and ``[DONE]``; the sequences are cancelled when the client goes away."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}

    async def events() -> AsyncIterator[str]:
        try:
            for first in first_choices or []:
                yield _sse({**head, "choices": [first], **extra})
            while gen.open:
                event = await gen.next()
                seq = seqs[event.index]
                if event.token_id is None:
                    continue  # finished without a token (cancelled): nothing to send
                seq.text += event.text
                yield _sse({**head, "choices": [choice(event, seq, event.text)], **extra})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": gen.usage(prompts)})
            yield "data: [DONE]\n\n"
        except APIError as exc:
            yield _sse(exc.body())
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()

    return EventStreamResponse(events(), headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------- chat
async def _chat(state: ServerState, http: HTTPRequest, req: ChatCompletionRequest,
                arrival: float) -> Response:
    template = state.chat_template
    ids = await _off_loop(encode_chat, state, req)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else \
        req.max_tokens
    max_tokens = check_length(state, ids, limit, param)
    top = (req.top_logprobs or 0) if req.logprobs else None
    stop = tuple(dict.fromkeys(stop_strings(req) + template.stop))
    seqs = _sampling(state, req, [ids], top, None, stop, [max_tokens])
    gen = _Generation(state, seqs, arrival)
    await gen.start()
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    fmt = LogprobFormatter(state.tokenizer)
    head = {"id": rid, "created": created, "model": state.model_name,
            "system_fingerprint": None}

    if req.stream:
        def choice(event, seq: _Seq, text: str) -> dict:
            lp = fmt.chat([event.logprobs]) if req.logprobs and event.logprobs else None
            return {"index": event.index, "delta": {"content": text}, "logprobs": lp,
                    "finish_reason": seq.finish_reason}

        # The role first, as OpenAI sends it.
        roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(len(seqs))]
        return _stream(gen, seqs, {**head, "object": "chat.completion.chunk"}, req, [ids],
                       choice, roles)

    await gen.run_to_end(http)
    choices = [{"index": i, "message": {"role": "assistant", "content": seq.text},
                "logprobs": fmt.chat(seq.logprobs) if req.logprobs else None,
                "finish_reason": seq.finish_reason} for i, seq in enumerate(seqs)]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                         "usage": gen.usage([ids])})
