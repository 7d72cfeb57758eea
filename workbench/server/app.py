"""The FastAPI app: OpenAI's routes, /health, /version, /metrics and the live engine config.

The routes run on uvicorn's event loop and never block it on the engine:
tokenizing a prompt and `engine.reconfigure` run in the loop's executor, and a
request's tokens arrive through its `RequestHandle`'s async iteration (the
engine thread wakes the loop once per step). A client that goes away cancels
its request, so its KV blocks return at the next step boundary.

Every error leaves as OpenAI's `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inputs import QueueFullError
from ..handle import RequestHandle
from ..request import RequestOutput
from . import protocol as p
from .metrics import ServerMetrics

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 4 * 2**20


@dataclass(frozen=True)
class ServerOptions:
    """How a server behaves; none of it changes while it runs."""

    api_key: str | None = None
    served_model_name: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_prompts: bool = False
    retry_after_s: int = 1


def model_id(engine: "Engine", served_model_name: str | None = None) -> str:
    """The id clients send as `model`: the given name, else the loaded model's name without its note
    ("SmolLM2-135M-Instruct (Q4_1, embedded)" -> "SmolLM2-135M-Instruct")."""
    return served_model_name or engine.loaded.name.split(" (")[0].strip().replace(" ", "-")


class ApiState:
    """What the routes share: the engine, the options, the metrics and this server's requests in flight."""

    def __init__(self, engine: "Engine", options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.model = model_id(engine, options.served_model_name)
        self.aliases = {self.model, engine.loaded.name}
        self.metrics = ServerMetrics(engine, self.model)
        self.inflight: dict[str, RequestHandle] = {}  # request id -> handle, for stop() and tests
        self._tasks: set[asyncio.Task] = set()
        self.started = time.time()

    def check_model(self, name: str | None) -> str:
        if name is not None and name not in self.aliases:
            raise p.APIError(404, f"The model `{name}` does not exist; this server serves `{self.model}`",
                             param="model", code="model_not_found")
        return self.model

    def finished(self, handle: RequestHandle) -> bool:
        """Record an ended request (call once per request); one still running is cancelled and
        recorded when it ends. True, so a caller can remember that it is done."""
        self.inflight.pop(handle.request_id, None)
        if handle.output is not None:
            self.metrics.record(handle.output)
            return True
        self.engine.cancel(handle.request_id)

        async def record_when_done() -> None:
            self.metrics.record(await handle.result_async())

        task = asyncio.get_running_loop().create_task(record_when_done())  # ends within a step: cancel is queued
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True


# ====================================================================== guards
class Guard:
    """Checks before routing: the API key on /v1 routes (constant-time) and the body size limit.

    The body is read here (up to the limit) and replayed to the app, so a chunked body
    over the limit is refused as surely as one that declares its length."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], api_key: str | None,
                 max_body_bytes: int) -> None:
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "a missing API key" if not given else "an incorrect API key"
                await _send_error(send, p.APIError(401, f"this server needs `Authorization: Bearer <key>`; "
                                                   f"the request had {message}", code="invalid_api_key",
                                                   headers={"WWW-Authenticate": "Bearer"}))
                return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        too_big = p.APIError(413, f"the request body is over this server's limit of {self.max_body_bytes} bytes",
                             code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_error(send, too_big)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await _send_error(send, too_big)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the client's disconnect

        await self.app(scope, replay, send)


async def _send_error(send: Send, error: p.APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class EventStream(StreamingResponse):
    """SSE that always listens for the client's disconnect and always closes its generator.

    Starlette's StreamingResponse may leave the generator suspended when the client goes
    away; closing it here runs its `finally` at once, which cancels the engine request."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        done = asyncio.Event()

        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # the client went away mid-write
                pass
            finally:
                done.set()

        async def disconnect() -> None:
            await self.listen_for_disconnect(receive)

        writer, listener = asyncio.ensure_future(stream()), asyncio.ensure_future(disconnect())
        try:
            await asyncio.wait({writer, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, listener):
                task.cancel()
            await asyncio.gather(writer, listener, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


# ====================================================================== app
def build_app(engine: "Engine", options: ServerOptions | None = None) -> FastAPI:
    """The ASGI app of one server over `engine` (its state is `app.state.api`)."""
    from importlib.metadata import version  # the installed distribution's, as pip shows it

    __version__ = version("cb-workbench")
    options = options or ServerOptions()
    state = ApiState(engine, options)
    app = FastAPI(title="cb-workbench OpenAI-compatible API", version=__version__,
                  description="OpenAI's completions and chat routes, Prometheus metrics and live engine config.")
    app.state.api = state
    app.add_middleware(Guard, api_key=options.api_key, max_body_bytes=options.max_body_bytes)

    @app.exception_handler(p.APIError)
    async def api_error(_: Request, exc: p.APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = p.validation_error(list(exc.errors()))  # 400, as OpenAI answers (FastAPI would say 422)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(p.error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        log.exception("the API server failed a request")
        return JSONResponse(p.error_body(500, f"internal server error: {type(exc).__name__}"), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, p.CompletionRequest)
        return await _generate(state, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, p.ChatCompletionRequest)
        return await _generate(state, request, body, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        state.check_model(name)
        return _model_card(state)

    @app.get("/v1/engine/config")
    async def get_config() -> dict[str, Any]:
        return _config_view(engine)

    @app.post("/v1/engine/config")
    async def set_config(request: Request) -> dict[str, Any]:
        changes = await _parse_object(request)
        loop = asyncio.get_running_loop()
        try:  # reconfigure validates here and then waits for the loop to apply it: off the event loop
            await loop.run_in_executor(None, partial(engine.reconfigure, **changes))
        except ValueError as exc:
            field = str(exc).split(" ", 1)[0]
            raise p.APIError(400, str(exc), param=field if field in changes else None) from None
        return _config_view(engine)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            raise p.APIError(503, "the engine is not running (it was stopped or it failed)", code="engine_dead")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        return {"version": __version__, "name": "cb-workbench", "model": state.model}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`, strictly: malformed JSON and wrong types are 400s naming the field."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise p.validation_error(list(exc.errors())) from None


async def _parse_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        value = json.loads(raw or b"{}")
    except ValueError as exc:
        raise p.APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise p.APIError(400, f"the body must be a JSON object, got {type(value).__name__}", code="invalid_body")
    return value


def _model_card(state: ApiState) -> dict[str, Any]:
    return {"id": state.model, "object": "model", "created": int(state.started), "owned_by": "cb-workbench",
            "root": state.engine.loaded.name, "max_model_len": state.engine.max_model_len}


def _config_view(engine: "Engine") -> dict[str, Any]:
    from ..config import LIVE_FIELDS

    return {"config": {k: getattr(engine.config, k) for k in LIVE_FIELDS}, "capacity": engine.capacity,
            "max_model_len": engine.max_model_len, "stats": engine.stats()}


# ====================================================================== generation
async def _generate(state: ApiState, request: Request, body: p.CompletionRequest | p.ChatCompletionRequest,
                    chat: bool) -> Response:
    """Validate, tokenize off the loop, submit; answer whole or as a stream."""
    engine = state.engine
    p.check_supported(body)
    model = state.check_model(body.model)
    prompt: Any = p.chat_messages(body) if chat else p.completion_prompt(body)  # type: ignore[arg-type]
    prompt_field = "messages" if chat else "prompt"
    requested, max_field = body.max_tokens, "max_tokens"
    if chat and body.max_completion_tokens is not None:  # type: ignore[union-attr]
        requested, max_field = body.max_completion_tokens, "max_completion_tokens"  # type: ignore[union-attr]
    loop = asyncio.get_running_loop()
    try:  # a long prompt's tokenizing must not stall the other streams
        ids = await loop.run_in_executor(None, engine.tokenize, prompt)
        default = engine.max_model_len - len(ids) if chat else p.COMPLETIONS_DEFAULT_MAX_TOKENS
        params = p.sampling_params(body, requested if requested is not None else max(1, default))
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        handle = engine.submit(ids, request_id=request_id, params=params)
    except QueueFullError as exc:
        raise p.APIError(429, f"{exc}; retry later", code="queue_full",
                         headers={"Retry-After": str(state.options.retry_after_s)}) from None
    except ValueError as exc:
        raise p.engine_value_error(exc, prompt_field=prompt_field, max_tokens_field=max_field) from None
    except RuntimeError as exc:  # the engine is stopped
        raise p.APIError(503, str(exc), code="engine_dead") from None
    state.inflight[request_id] = handle
    if state.options.log_prompts:
        log.info("%s prompt: %r", request_id, prompt)
    log.debug("%s: %d prompt tokens, %s=%d, stream=%s", request_id, len(ids), max_field, params.max_new_tokens,
              body.stream)
    shape = p.ResponseShape.new(chat, request_id, model)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_events(state, handle, shape, len(ids), include_usage))
    output = await _result_or_disconnect(state, handle, request)
    if output is None:
        return Response(status_code=499)  # nobody reads it: the client is gone
    if output.finish_reason == "error":
        raise p.APIError(500, f"the engine failed this request: {output.error}", code="engine_error")
    return JSONResponse(shape.full(output))


async def _result_or_disconnect(state: ApiState, handle: RequestHandle, request: Request) -> RequestOutput | None:
    """The request's output, or None (request cancelled) if the client disconnects first."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    result, watcher = asyncio.ensure_future(handle.result_async()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not result.done():
            result.cancel()
        state.finished(handle)  # records the output, or cancels the request and records it when it ends
    return result.result() if result.done() and not result.cancelled() else None


async def _events(state: ApiState, handle: RequestHandle, shape: p.ResponseShape, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE body: chunks as tokens come, the finish, the usage if asked for, then [DONE].

    The request is recorded in the metrics before its last event leaves, so a scrape that
    follows the client's `[DONE]` sees it."""
    prefix, suffix = shape.text_events(include_usage)
    recorded = False
    try:
        if shape.chat:
            yield p.sse(shape.chunk("", role=True, with_usage_key=include_usage))
        async for chunk in handle.chunks():
            if chunk.finished and handle.output is None:  # the engine sets the output just after the last chunk
                await handle.result_async()
            if chunk.error is not None:
                recorded = state.finished(handle)
                error = p.error_body(500, f"the engine failed this request: {chunk.error}", code="engine_error")
                yield p.sse(error)
                yield p.SSE_DONE
                return
            if chunk.text:
                yield prefix + json.dumps(chunk.text, ensure_ascii=False).encode() + suffix
            if chunk.finished:
                recorded = state.finished(handle)
                yield p.sse(shape.chunk(None if shape.chat else "", p.finish_reason(chunk.finish_reason),
                                        with_usage_key=include_usage))
        output = handle.output
        if include_usage and output is not None:
            yield p.sse(shape.usage_chunk(prompt_tokens, len(output.token_ids)))
        yield p.SSE_DONE
    finally:
        if not recorded:  # the client left (or the server stops) before the end: cancel, record when it ends
            state.finished(handle)
