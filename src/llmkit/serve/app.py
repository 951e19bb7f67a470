"""The FastAPI application: routes, authentication and error handlers.

    GET  /v1/models, /v1/models/{id}     the base model and one name per served adapter
    POST /v1/completions                 prompt: a string, a list of strings, token ids, or lists of ids
    POST /v1/chat/completions            messages through the chat template
    GET  /health                         200 while serving, 503 while draining or if the engine died
    GET  /metrics                        Prometheus text (metrics.py)

With an api_key, every /v1 route wants `Authorization: Bearer <key>` (401 otherwise); /health and
/metrics stay open, as for vLLM, so probes and scrapers need no secret.

A request is split into engine requests (one per prompt; the engine runs the n samples), handed to
the engine thread (bridge.py), and its outputs are read back from one asyncio queue. A client that
disconnects (mid-stream, or while a non-streamed request waits) has its engine requests cancelled,
which frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import responses as R
from ..jobs.tokenizers import encode_prompt
from .bridge import EngineBridge, EngineError
from .chat import chat_prompt
from .errors import APIError, bad_request, error_body
from .metrics import render
from .protocol import (ChatCompletionRequest, CompletionRequest, check_chat, check_completion, max_new_tokens,
                       sampling_params)

log = logging.getLogger("llmkit.serve")


@dataclass
class ServerState:
    bridge: EngineBridge
    tokenizer: object
    model_name: str                          # the base model's served name
    adapters: list[str] = field(default_factory=list)
    api_key: Optional[str] = None
    chat_template: Optional[str] = None      # overrides the tokenizer's
    created: int = field(default_factory=lambda: int(time.time()))
    poll_s: float = 0.2                      # how often a waiting non-streamed request checks its client
    json_grammar: object = None              # infer.json_mode.JsonObject, built on the first JSON-mode request

    @property
    def max_model_len(self) -> int:
        return self.bridge.engine.max_model_len

    def resolve(self, model: Optional[str]) -> Optional[str]:
        """The adapter a model name asks for (None: the base model); 404 listing the served names."""
        if model is None or model == self.model_name:
            return None
        if model in self.adapters:
            return model
        raise APIError(404, f"The model {model!r} does not exist: expected one of the served models "
                            f"{[self.model_name, *self.adapters]}", param="model", code="model_not_found")


class ClientGone(Exception):
    pass


@dataclass
class _Choice:
    delta: R.TextDelta
    sent_logprobs: int = 0
    started: bool = False
    done: bool = False


class _Run:
    """One HTTP request's engine requests, and what its response has sent so far."""

    def __init__(self, state: ServerState, kind: str, model: str, prompts: list[list[int]], params: list,
                 adapter: Optional[str], n: int):
        self.state, self.kind, self.model, self.n = state, kind, model, n
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompts, self.params, self.adapter = prompts, params, adapter
        self.engine_ids = [f"{self.id}-{i}" for i in range(len(prompts))]
        self.base = {rid: i * n for i, rid in enumerate(self.engine_ids)}       # choice index of sample 0
        self.choices = {i: _Choice(R.TextDelta(params[i // n].stop)) for i in range(len(prompts) * n)}
        self.outputs: dict[str, object] = {}                                    # engine id -> last RequestOutput
        self.queue: asyncio.Queue = asyncio.Queue()
        self.open: set[str] = set()

    async def submit(self) -> None:
        """Hand every prompt to the engine; on any refusal cancel those already taken and raise."""
        try:
            for rid, prompt, params in zip(self.engine_ids, self.prompts, self.params):
                try:
                    await self.state.bridge.add(rid, prompt, params, self.adapter, self.queue)
                except ValueError as exc:        # the engine's own checks (context, KV budget, n)
                    raise _engine_refusal(exc, self.kind) from exc
                self.open.add(rid)
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for rid in self.open:
            self.state.bridge.cancel(rid)
        self.open.clear()

    async def events(self, request: Request):
        """(engine id, RequestOutput | EngineError) until every engine request ended; ClientGone if the
        client disconnects meanwhile."""
        checked = time.monotonic()
        while self.open:
            try:                                  # wait_for costs a task: only when there is nothing yet
                rid, item = self.queue.get_nowait() if not self.queue.empty() else \
                    await asyncio.wait_for(self.queue.get(), self.state.poll_s)
            except asyncio.TimeoutError:
                rid = item = None
            if time.monotonic() - checked >= self.state.poll_s:      # by the clock: outputs may never pause
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise ClientGone()
            if item is None:
                continue
            if isinstance(item, Exception) or item.finished:
                self.open.discard(rid)
            if not isinstance(item, Exception):
                self.outputs[rid] = item
            yield rid, item

    def usage(self) -> dict:
        outs = [self.outputs[rid] for rid in self.engine_ids if rid in self.outputs]
        return R.usage(sum(len(p) for p in self.prompts), sum(len(c.token_ids) for o in outs for c in o.outputs),
                       sum(o.num_cached_tokens for o in outs))


def _engine_refusal(exc: ValueError, kind: str) -> APIError:
    message = str(exc)
    param = "n" if "SamplingParams.n" in message else "max_tokens" if "new tokens" in message else \
        ("messages" if kind == "chat" else "prompt")
    return APIError(400, message, param=param)


def _failure(item: EngineError) -> APIError:
    return APIError(item.status, str(item))


def _choice_error(out) -> Optional[str]:
    return next((c.error or "the request failed" for c in out.outputs if c.finish_reason == "error"), None)


# ---- request building -----------------------------------------------------------------------------
def _completion_prompts(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    prompt, tok, vocab = req.prompt, state.tokenizer, state.bridge.engine.config.vocab_size
    one = isinstance(prompt, str) or all(isinstance(p, int) for p in prompt)     # a string, or one id list
    out = []
    for i, item in enumerate([prompt] if one else prompt):
        if isinstance(item, str):
            try:
                ids = encode_prompt(tok, item)
            except ValueError as exc:
                raise bad_request("prompt", f"prompt[{i}]: {exc}") from exc
        else:
            ids = list(item)
            if not ids or not all(0 <= t < vocab for t in ids):
                raise bad_request("prompt", f"prompt[{i}]={str(ids)[:60]}: expected a non-empty list of token ids "
                                            f"in [0, {vocab})")
        out.append(ids)
    return out


def _json_constraint(state: ServerState, req):
    """JSON mode: a JsonObject constraint for the request (one per prompt: it keeps its state)."""
    fmt = getattr(req, "response_format", None)
    if fmt is None or fmt.type != "json_object":
        return None
    if state.json_grammar is None:                  # built on first use: one decode per vocabulary entry
        from ..infer.json_mode import JsonObject
        engine = state.bridge.engine
        try:
            state.json_grammar = JsonObject(state.tokenizer, list(engine.eos_ids), engine.config.vocab_size)
        except ValueError as exc:
            raise bad_request("response_format", f"response_format json_object: {exc}") from exc
    return state.json_grammar.constraint()


def _params_for(state, req, prompts, requested, default, name, logprobs, param):
    """One SamplingParams per prompt (max_tokens is checked against each prompt's room)."""
    params = []
    for ids in prompts:
        if len(ids) >= state.max_model_len:
            raise bad_request(param, f"This model's maximum context length is {state.max_model_len} tokens. "
                                     f"However, your {param} has {len(ids)} tokens. Expected at most "
                                     f"{state.max_model_len - 1}, leaving room for the completion.")
        budget = max_new_tokens(requested, len(ids), state.max_model_len, default, name)
        params.append(sampling_params(req, budget, logprobs, _json_constraint(state, req)))
    return params


# ---- response building ----------------------------------------------------------------------------
def _final(run: _Run, echo: bool) -> dict:
    choices, tok = [], run.state.tokenizer
    for pi, rid in enumerate(run.engine_ids):
        out = run.outputs[rid]
        for c in out.outputs:
            index = run.base[rid] + c.index
            text = c.text or ""
            if run.kind == "chat":
                lp = R.chat_logprobs(tok, c.logprobs) if c.logprobs is not None else None
                choices.append(R.chat_choice(index, text, c.finish_reason, lp))
            else:
                head = tok.decode(run.prompts[pi]) if echo else ""
                lp = R.completion_logprobs(tok, c.logprobs, len(head)) if c.logprobs is not None else None
                choices.append(R.completion_choice(index, head + text, c.finish_reason, lp))
    obj = "chat.completion" if run.kind == "chat" else "text_completion"
    return R.envelope(run.id, obj, run.created, run.model, sorted(choices, key=lambda c: c["index"]),
                      usage=run.usage())


def _chunks(run: _Run, rid: str, out, echo: bool, extra: dict) -> list[dict]:
    """The chunks one engine output adds: per choice its new text (and logprobs), finish_reason on
    the chunk with its last text."""
    chunks, tok = [], run.state.tokenizer
    for c in out.outputs:
        index = run.base[rid] + c.index
        choice = run.choices[index]
        if choice.done:
            continue
        finished = c.finish_reason is not None
        piece = choice.delta.update(c.text or "", finished)
        entries = (c.logprobs or [])[choice.sent_logprobs:]
        choice.sent_logprobs += len(entries)
        if not (piece or entries or finished):
            continue
        choice.done = finished
        reason = c.finish_reason
        if run.kind == "chat":
            lp = R.chat_logprobs(tok, entries) if c.logprobs is not None else None
            chunks.append(R.envelope(run.id, "chat.completion.chunk", run.created, run.model,
                                     [R.chat_delta(index, {"content": piece}, reason, lp)], **extra))
        else:
            head = ""
            if echo and not choice.started:
                head = tok.decode(run.prompts[index // run.n])
            lp = R.completion_logprobs(tok, entries, len(choice.delta.shown) - len(piece)) \
                if c.logprobs is not None else None
            chunks.append(R.envelope(run.id, "text_completion", run.created, run.model,
                                     [R.completion_choice(index, head + piece, reason, lp)], **extra))
        choice.started = True
    return chunks


async def _stream(run: _Run, request: Request, echo: bool, include_usage: bool):
    extra = {"usage": None} if include_usage else {}
    try:
        if run.kind == "chat":           # the role first, at once: the client sees the answer has begun
            for i in sorted(run.choices):
                yield R.sse(R.envelope(run.id, "chat.completion.chunk", run.created, run.model,
                                       [R.chat_delta(i, {"role": "assistant", "content": ""}, None)], **extra))
        async for rid, item in run.events(request):
            if isinstance(item, Exception):
                yield R.sse(_failure(item).body())
                run.cancel()
                break
            for chunk in _chunks(run, rid, item, echo, extra):
                yield R.sse(chunk)
            message = _choice_error(item)
            if message is not None:
                yield R.sse(error_body(500, message))
                run.cancel()
                break
        else:
            if include_usage:
                obj = "chat.completion.chunk" if run.kind == "chat" else "text_completion"
                yield R.sse(R.envelope(run.id, obj, run.created, run.model, [], usage=run.usage()))
        yield R.sse("[DONE]")
    except ClientGone:
        pass
    finally:                              # a disconnect (Starlette cancels this generator) or the end
        run.cancel()


async def _respond(run: _Run, request: Request, stream: bool, echo: bool, include_usage: bool):
    await run.submit()
    if stream:
        return StreamingResponse(_stream(run, request, echo, include_usage), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
    try:
        async for rid, item in run.events(request):
            if isinstance(item, Exception):
                raise _failure(item)
            message = _choice_error(item)
            if message is not None:               # this request's own failure: a retry would fail again
                raise APIError(500, message, retry=False)
    except ClientGone:
        return PlainTextResponse("", status_code=499)         # nobody reads it; nginx's "client closed"
    finally:
        run.cancel()
    return JSONResponse(_final(run, echo))


# ---- the application ------------------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.bridge.stop()                            # the engine loop ends once the server has

    app = FastAPI(title="llmkit", lifespan=lifespan)
    app.state.llmkit = state

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise APIError(401, "Missing API key: expected the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), state.api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    auth = [Depends(authorize)]

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def malformed(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return JSONResponse(error_body(422, f"{where}: {first.get('msg', 'malformed request body')} "
                                            f"({len(errors)} problem{'s' if len(errors) != 1 else ''} in the body)",
                                       param=where), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal server error ({type(exc).__name__}); the server log has "
                                            "the details"), status_code=500)

    def model_card(name: str, parent: Optional[str]) -> dict:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "llmkit", "parent": parent,
                "max_model_len": state.max_model_len}

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return {"object": "list", "data": [model_card(state.model_name, None)] +
                [model_card(a, state.model_name) for a in state.adapters]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str):
        adapter = state.resolve(model_id)
        return model_card(model_id, None if adapter is None else state.model_name)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        check_completion(req)
        adapter = state.resolve(req.model)
        prompts = _completion_prompts(state, req)
        params = _params_for(state, req, prompts, req.max_tokens, 16, "max_tokens", req.logprobs,
                             "prompt")
        run = _Run(state, "completions", req.model or state.model_name, prompts, params, adapter, req.n)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _respond(run, request, req.stream, req.echo, include_usage)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_chat(req)
        adapter = state.resolve(req.model)
        name = req.model or state.model_name
        prompt = chat_prompt(state.tokenizer, req.messages, state.chat_template, name)
        requested, which = (req.max_completion_tokens, "max_completion_tokens") \
            if req.max_completion_tokens is not None else (req.max_tokens, "max_tokens")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = _params_for(state, req, [prompt], requested, None, which, logprobs, "messages")
        run = _Run(state, "chat", name, [prompt], params, adapter, req.n)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _respond(run, request, req.stream, False, include_usage)

    @app.get("/health")
    async def health():
        bridge = state.bridge
        if not bridge.running:
            return JSONResponse({"status": "engine loop not running"}, status_code=503)
        if bridge.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render(state.bridge), media_type="text/plain; version=0.0.4")

    return app
