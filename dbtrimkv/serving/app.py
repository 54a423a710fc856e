"""The HTTP side: FastAPI routes in OpenAI's shape around one engine: an `Engine` in this process,
or an `EngineProcess` (the engine in a process of its own; the same calls).

Why: OpenAI clients, curl and load balancers talk HTTP; the engine thread talks tokens. Each
request is validated and handed to the engine's `prepare` (in a worker thread, so media decoding
and the processor never block the event loop; `submission.py`), then answered from the events the
engine sends back: one JSON completion, or server-sent chunks when `stream` is set. A client that
goes away is cancelled at once, which frees its KV slots at the next token boundary.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`,
`GET /metrics`. Every error, on every path (unknown path 404, wrong method 405, 400, 401, 409, 413,
429, 500, 503), is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`. No route
answers 422: the server parses bodies itself and a malformed one is a 400, as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from . import refusals
from .api_errors import (APIError, MethodNotAllowed, ModelNotFound, NotFound, Unauthorized, Unavailable,
                         server_failure)
from .request_bounds import parse_json, read_body
from .channel import EventChannel
from .responses import Completion, sse
from .schema import ServerLimits, parse_chat_request


@dataclass(frozen=True)
class HTTPOptions:
    api_key: str | None = None
    max_request_bytes: int = 64 * 1024 * 1024
    max_prompt_tokens: int = 32768


def build_app(engine, limits: ServerLimits, options: HTTPOptions = HTTPOptions()) -> FastAPI:
    """The app around `engine`: an `engine.Engine`, or an `engine_process.EngineProcess` (the same calls)."""
    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="dbtrimkv", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        if exc.status != 429:
            engine.count_rejection(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            error = NotFound(f"no route {request.method} {request.url.path}; see GET /v1/models, "
                             "POST /v1/chat/completions")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}",
                                     allow=(exc.headers or {}).get("Allow"))
        else:
            error = APIError(str(exc.detail))
            error.status = exc.status_code
        return await api_error(request, error)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # a bug: one clear 500 (the log has the traceback)
        return await api_error(request, server_failure(exc))

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
            raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer <key>')")

    @app.get("/health")
    async def health():
        reason = engine.unavailable()
        if reason is not None:
            raise Unavailable(reason)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        text = await run_in_threadpool(engine.metrics_text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [await model(limits.model_name, request)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id != limits.model_name:
            raise ModelNotFound(refusals.model_not_found(model_id, limits.model_name), param="model")
        return {"id": limits.model_name, "object": "model", "created": 0, "owned_by": "dbtrimkv"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        reason = engine.unavailable()
        if reason is not None:
            raise Unavailable(reason)
        events = EventChannel(asyncio.get_running_loop())
        body = [await read_body(request, options.max_request_bytes)]  # (no other reference: see `_submit`)
        chat, job, extra = await run_in_threadpool(_submit, engine, body, limits, events.put, options.max_prompt_tokens)
        completion = Completion(limits.model_name, extra)
        if chat.stream:
            return StreamingResponse(_stream(engine, job, events, completion, chat.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(engine, job, events, completion, request)

    return app


def _submit(engine, body: list[bytes], limits: ServerLimits, sink, max_prompt_tokens: int):
    """Parse and validate the body, build the prompt and submit it: one worker-thread hand-off per request
    (three, one per stage, cost the event loop and the engine, which share the GIL, a wake-up each).
    `body` holds the only reference to the raw bytes, taken out here so that they are freed once parsed
    (a large body is not held while its images are decoded)."""
    chat = parse_chat_request(parse_json(body.pop()), limits)
    job, extra = engine.prepare(chat, sink, max_prompt_tokens)
    return chat, job, extra


async def _collect(engine, job: str, events: EventChannel, completion: Completion,
                   request: Request):
    """Wait for the whole answer; cancel the request if the client disconnects first."""
    pieces = []

    async def answer():
        while True:
            for event in await events.take():
                if event.kind != "token":
                    return event
                pieces.append(event.text)

    async def gone():
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)

    waiter, watcher = asyncio.create_task(answer()), asyncio.create_task(gone())
    try:
        done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if waiter not in done:
        waiter.cancel()
        engine.cancel(job)
        return PlainTextResponse("client disconnected", status_code=499)
    event = waiter.result()
    if event.kind == "error":
        raise event.error
    return JSONResponse(completion.full("".join(pieces), event.finish_reason, event.usage))


async def _stream(engine, job: str, events: EventChannel, completion: Completion,
                  include_usage: bool):
    finished = False
    try:
        yield sse(completion.chunk({"role": "assistant", "content": ""}))
        while not finished:
            for event in await events.take():
                if event.kind == "token":
                    yield sse(completion.chunk({"content": event.text}))
                    continue
                finished = True
                if event.kind == "error":
                    yield sse(event.error.body())
                else:
                    yield sse(completion.chunk({}, event.finish_reason))
                    if include_usage:
                        yield sse(completion.usage_chunk(event.usage))
                yield sse("[DONE]")
                return
    finally:
        if not finished:
            engine.cancel(job)
