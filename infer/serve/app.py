"""The HTTP side: an OpenAI-compatible FastAPI app over one EngineLoop.

Handlers parse, tokenize, enqueue and await; the engine thread (loop.py) does everything else. Every
error leaves in OpenAI's shape {"error": {"message", "type", "param", "code"}}: validation and malformed
JSON are 400, unknown models and adapters 404, a missing or wrong key 401, an existing adapter name 409,
an adapter file the loader refuses 422, a full waiting line 503 with Retry-After. An unexpected exception
is logged here and answered as a bare 500, never with a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from infer.engine import Engine
from infer.serve.loop import EngineLoop, Handle
from infer.serve.protocol import (
    AdapterLoad,
    ChatRequest,
    CompletionRequest,
    Reply,
    ServeError,
    error_body,
    model_card,
    usage,
)

log = logging.getLogger("infer.serve")
_TYPE_LABEL = re.compile(r"^(str|int|float|bool|dict|list|none)$|\[")


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_waiting: int = 256) -> FastAPI:
    """The app serving `engine`'s model as `model_name` (and each of its adapters by name). The engine thread
    starts and stops with the app's lifespan; `app.state.loop` is the EngineLoop (tests read its counters)."""
    loop = EngineLoop(engine, model_name, max_waiting)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loop.stop)

    app = FastAPI(title="parallama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loop = loop
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    _add_error_handlers(app)
    tok = engine.tokenizer
    context = engine.model.args.max_seq_len
    pool_tokens = engine.cache.num_blocks * engine.cache.block_size

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = loop.alive
        free = engine.cache.allocator.num_free
        body = {"status": "ok" if ok else "engine stopped", "running": len(engine.running), "waiting": loop.waiting()}
        body.update(free_blocks=free, num_blocks=engine.cache.num_blocks)
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [model_card(model_name, created, "parallama")]
        cards += [model_card(n, created, "parallama", parent=model_name) for n in loop.adapters()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name == model_name:
            return model_card(model_name, created, "parallama")
        if name in loop.adapters():
            return model_card(name, created, "parallama", parent=model_name)
        raise ServeError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        prompt = body.one_prompt()
        if isinstance(prompt, str):
            if tok is None:
                raise ServeError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            ids = tok.encode(prompt)
        else:
            ids = list(prompt)
        params = body.sampling_params(16 if body.max_tokens is None else body.max_tokens)
        return await _answer(loop, request, body, ids, params, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        if tok is None:
            raise ServeError(400, "this model has no tokenizer, so no chat template", param="messages")
        try:
            ids = tok.encode_chat(body.chat())
        except Exception as e:  # no template, or the template's own raise_exception (e.g. roles out of order)
            raise ServeError(400, f"chat template: {e}", param="messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        # OpenAI's chat default: as long as the context (and a pool that must hold it alone) allows
        params = body.sampling_params(limit or max(1, min(context, pool_tokens) - len(ids)))
        return await _answer(loop, request, body, ids, params, chat=True)

    @app.post("/v1/adapters")
    async def load(body: AdapterLoad) -> dict[str, Any]:
        if loop.exists(body.name):  # answered before the (slow) load; the engine thread checks again
            raise ServeError(409, f"a model named {body.name!r} exists", param="name", code="model_exists")
        from model.peft import AdapterError
        from weights.adapters import load_adapter

        try:  # off the event loop and off the engine thread: steps go on while the files are read
            adapter = await asyncio.to_thread(load_adapter, body.path, engine.model)
        except (AdapterError, OSError) as e:
            raise ServeError(422, str(e), param="path", code="invalid_adapter") from None
        await loop.load_adapter(body.name, adapter)
        return model_card(body.name, int(time.time()), "parallama", parent=model_name)

    @app.delete("/v1/adapters/{name:path}")
    async def unload(name: str) -> dict[str, Any]:
        users = await loop.unload_adapter(name)
        return {"id": name, "object": "model", "deleted": True, "in_flight": users}

    return app


async def _answer(
    loop: EngineLoop, request: Request, body: CompletionRequest | ChatRequest, ids: list[int], params: Any, chat: bool
) -> JSONResponse | StreamingResponse:
    handle = await loop.submit(ids, params, body.model)
    reply = Reply(chat, body.model, body.return_token_ids)
    if body.stream:
        return _SSE(loop, handle, _stream(handle, reply, body.include_usage, len(ids)))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        async for ev in _racing(handle, watcher):
            if ev.error:
                raise ServeError(500, ev.error, code="engine_error")
            if ev.finish_reason:
                use = usage(len(ids), len(ev.output_ids))
                return JSONResponse(reply.whole(ev.final_text, ev.output_ids, ev.finish_reason, use))
        return JSONResponse({}, status_code=499)  # the client left; nobody reads this
    finally:
        watcher.cancel()
        loop.abort(handle)  # a no-op once the request finished


async def _racing(handle: Handle, watcher: asyncio.Future[None]) -> AsyncIterator[Any]:
    """The handle's events until it finishes or `watcher` (the client left) completes first."""
    while not handle.done:
        get = asyncio.ensure_future(handle.queue.get())
        await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            return
        ev = get.result()
        handle.done = ev.finish_reason is not None or ev.error is not None
        yield ev


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body is read, so receive() only reports the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(handle: Handle, reply: Reply, include_usage: bool, prompt_len: int) -> AsyncIterator[str]:
    """SSE in OpenAI's chunk format, ending with `data: [DONE]`."""
    if reply.chat:  # OpenAI's first chat chunk: the role, no content yet
        yield _data(reply.chunk("", [], None, first=True, with_usage=include_usage))
    async for ev in handle.events():
        if ev.error:
            yield _data(error_body(500, ev.error, code="engine_error"))
            break
        if reply.chat and ev.finish_reason:  # content, then an empty delta carrying the finish reason
            if ev.text or (reply.token_ids and ev.token_ids):
                yield _data(reply.chunk(ev.text, ev.token_ids, None, with_usage=include_usage))
            yield _data(reply.chunk("", [], ev.finish_reason, with_usage=include_usage))
        else:
            yield _data(reply.chunk(ev.text, ev.token_ids, ev.finish_reason, with_usage=include_usage))
        if ev.finish_reason and include_usage:
            yield _data(reply.usage_chunk(usage(prompt_len, len(ev.output_ids))))
    yield "data: [DONE]\n\n"


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _SSE(StreamingResponse):
    """An event stream whose request is aborted however the response ends (finished, client gone, error):
    Starlette cancels the body when the client disconnects, and this `finally` frees the request's blocks."""

    def __init__(self, loop: EngineLoop, handle: Handle, body: AsyncIterator[str]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.loop, self.handle = loop, handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.loop.abort(self.handle)


class BearerAuth:
    """`Authorization: Bearer KEY` on every route but /health (a load balancer's probe); 401 otherwise."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        msg = "Incorrect API key provided." if header else "Missing bearer API key (Authorization: Bearer KEY)."
        await _json(401, error_body(401, msg, code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})(
            scope, receive, send
        )


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_: Request, e: ServeError) -> JSONResponse:
        return _json(e.status, e.body(), e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return _json(400, error_body(400, f"malformed JSON body: {first.get('msg')}", code="json_invalid"))
        if tuple(first.get("loc", ())) == ("body",):  # not an object, or not sent as JSON
            msg = "the body must be a JSON object, sent with Content-Type: application/json"
            return _json(400, error_body(400, msg, code="invalid_body"))
        # pydantic names a union's member in the path ("prompt", "list[int]"): keep fields and indices only
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_LABEL.match(str(p))]
        param = loc[0] if loc else None
        msg = f"{'.'.join(loc)}: {first.get('msg')}" if loc else str(first.get("msg"))
        return _json(400, error_body(400, msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _json(e.status_code, error_body(e.status_code, str(e.detail)), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error while serving a request", exc_info=e)
        return _json(500, error_body(500, "internal server error", code="internal_error"))
