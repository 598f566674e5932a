"""The OpenAI-compatible server (FastAPI): /v1/models, /v1/completions, /v1/chat/completions (streaming too),
/v1/classify (post + task -> labels, explanation, scores, notice), /v1/tasks, /health, /ready, /docs and the demo
page at /.

Both backends (`serving/backends.py`) sit behind the same routes. Prompts are rendered here, off the event loop,
so both see the same token ids. The server holds under load and bad input: bodies are size-limited (413 before
more is read) and validated (4xx with a message), max_tokens is capped, a full queue answers 503 with
Retry-After before any stream starts, each request has a timeout, a client that goes away cancels its
generation, an API key is required off loopback (for /docs too), request text is never logged, and shutdown
finishes the requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from mentalglm.config import ServeSettings
from mentalglm.runtime.generation import RowRequest, RowResult, TokenLogprob
from mentalglm.serving.backends import Backend, ServedModel
from mentalglm.serving.batcher import Cancelled, QueueFull
from mentalglm.serving.predictor import NOTICE, InputError, Predictor, read
from mentalglm.serving.schema import (
    ChatBody,
    ClassifyBody,
    CompletionBody,
    OpenAIBody,
    logprobs_asked,
    refused_field,
)

log = logging.getLogger("mentalglm.serve")
OPEN_PATHS = ("/health", "/ready", "/")  # probes and the page (which asks for the key itself)


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers
    )


# ----------------------------------------------------------------------------- the guard in front of every route
class Guard:
    """Plain ASGI in front of the app: the API key (any case of `Bearer`), the body-size limit (413 as soon as a
    body is known to pass it, from Content-Length or while reading) and one log line per request, never its body.
    The body is read here and handed on whole, so the routes' `receive` afterwards reports the client leaving."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal, receive = await self.check(scope, receive)
            await (refusal or self.app)(scope, receive, logged_send)
        finally:
            ms = 1000 * (time.perf_counter() - start)
            log.info("%s %s %d %.0f ms", scope["method"], scope["path"], status[0], ms)

    async def check(self, scope, receive):
        """(a response refusing the request or None, the receive the app reads the request from)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS and not self.authorized(headers.get("authorization")):
            message = "missing or wrong API key (Authorization: Bearer <key>)"
            return _error(401, message, "authentication_error"), receive
        too_big = _error(413, f"the body is larger than {self.max_body_bytes} bytes (serve.max_body_bytes)")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return too_big, receive
        body, more = bytearray(), scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, receive
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return too_big, receive
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return None, replay

    def authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


# ----------------------------------------------------------------------------- one request's generation
class Generation:
    """The rows of one request on the backend: admitted at once (`QueueFull` before anything is queued), awaited
    under the request's timeout, stopped when the client leaves, the timeout passes or the caller stops it."""

    def __init__(self, backend: Backend, request: Request, rows: list[RowRequest], timeout_s: float):
        self.cancelled = threading.Event()
        rows = [replace(row, cancelled=self.cancelled.is_set) for row in rows]
        self.results = asyncio.gather(*backend.submit(rows))
        self.left = asyncio.ensure_future(_client_leaves(request))
        self.deadline = time.monotonic() + timeout_s

    async def wait(self) -> list[RowResult]:
        try:
            left = max(self.deadline - time.monotonic(), 0)
            done, _ = await asyncio.wait({self.results, self.left}, timeout=left, return_when="FIRST_COMPLETED")
            if self.results in done:
                return self.results.result()
            raise Cancelled() if self.left in done else TimeoutError()
        finally:
            self.stop()

    def stop(self) -> None:
        self.left.cancel()
        if not self.results.done():
            self.cancelled.set()  # rows in a batch stop at their next token; queued ones are skipped
            self.results.cancel()


async def _client_leaves(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def chat_logprobs(logprobs: tuple[TokenLogprob, ...] | None) -> dict | None:
    """A chat choice's `logprobs`, as OpenAI shapes it."""

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    if logprobs is None:
        return None
    return {
        "content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(*alt) for alt in t.top]} for t in logprobs],
        "refusal": None,
    }


def text_logprobs(logprobs: tuple[TokenLogprob, ...] | None) -> dict | None:
    """A completion choice's `logprobs` (the legacy shape: tokens, token_logprobs, top_logprobs, text_offset)."""
    if logprobs is None:
        return None
    offsets, at = [], 0
    for t in logprobs:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in logprobs],
        "token_logprobs": [t.logprob for t in logprobs],
        "top_logprobs": [dict(t.top) for t in logprobs],
        "text_offset": offsets,
    }


def _refusal(e: Exception, settings: ServeSettings) -> JSONResponse:
    if isinstance(e, QueueFull):
        headers = {"Retry-After": str(settings.retry_after_s)}
        return _error(503, "the server is busy: too many requests are waiting", "unavailable", headers)
    if isinstance(e, TimeoutError):
        return _error(504, f"generation took longer than {settings.timeout_s:g} s", "timeout")
    return _error(499, "the client closed the connection", "cancelled")


REFUSED = (QueueFull, TimeoutError, Cancelled)


async def _body(request: Request, model: type[BaseModel]) -> BaseModel | JSONResponse:
    """The request's JSON as `model`, or a 400 saying what is wrong (never a 500, whatever the bytes)."""
    raw = await request.body()
    try:
        doc = json.loads(raw)
        json.dumps(doc, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\ud800) is not text
    except RecursionError:
        return _error(400, "the body is not JSON this server reads (nested too deeply)")
    except UnicodeEncodeError:
        return _error(400, "the body holds a lone surrogate escape (\\ud800-\\udfff), which is not text")
    except ValueError as e:  # not JSON, not UTF-8, an integer of thousands of digits
        return _error(400, f"the body is not JSON ({getattr(e, 'msg', None) or str(e)[:120]})")
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5]]
        return _error(400, "invalid request: " + "; ".join(problems))


# ----------------------------------------------------------------------------- the app
def create_app(
    backend: Backend,
    settings: ServeSettings,
    *,
    api_key: str | None = None,
    models: dict[str, ServedModel] | None = None,
) -> Guard:
    """The server; `models` (id -> prompts and adapter) defaults to the backend's model as `serve.model_name`."""
    predictor: Predictor = backend.predictor
    models = models or {settings.model_name: ServedModel(predictor, "")}
    state = {"ready": True, "in_flight": 0, "served": 0}
    # Prompts are tokenised on one thread of their own: never on the event loop, never two at once on the tokenizer.
    tokenising = ThreadPoolExecutor(1, thread_name_prefix="mentalglm-prompts")

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenising, fn, *args)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # Shutdown: uvicorn has stopped accepting and let the requests in flight finish.
        state["ready"] = False
        backend.close()
        tokenising.shutdown(wait=False)

    app = FastAPI(title="MentalGLM", version="1", docs_url="/docs", redoc_url=None, lifespan=lifespan)

    # ------------------------------------------------------------------ probes, page
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not state["ready"]:
            return _error(503, "shutting down", "unavailable")
        upstream = getattr(getattr(backend, "client", None), "base_url", None)
        return {
            "status": "ready",
            "backend": backend.name,
            "model": settings.model_name,
            **({"vllm_url": upstream} if upstream else {}),
        }

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("mentalglm.serving").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "mentalglm"} for name in models],
        }

    @app.get("/v1/tasks")
    async def tasks():
        return {
            "tasks": [
                {
                    "name": t.name,
                    "display_name": t.display_name,
                    "language": t.language,
                    "kind": t.kind,
                    "aspects": list(t.aspects),
                }
                for t in predictor.tasks.values()
            ],
            "notice": NOTICE,
        }

    # ------------------------------------------------------------------ generation
    def unknown(model: str) -> JSONResponse:
        served = ", ".join(repr(m) for m in models)
        return _error(404, f"model {model!r} does not exist; this server serves {served}", "not_found_error")

    def check(body: OpenAIBody) -> int | JSONResponse:
        """The request's token cap, or the error that refuses it."""
        if body.model not in models:
            return unknown(body.model)
        if refused := refused_field(body):
            return _error(400, refused)
        if isinstance(asked := logprobs_asked(body, isinstance(body, ChatBody)), str):
            return _error(400, asked)
        if (body.n or 1) > settings.max_choices:
            return _error(400, f"n is {body.n}; this server allows at most {settings.max_choices} (serve.max_choices)")
        if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
            return _error(400, "max_tokens and max_completion_tokens differ; send one of them")
        return capped(body.max_completion_tokens or body.max_tokens or settings.max_tokens)

    def capped(max_tokens: int) -> int | JSONResponse:
        if max_tokens > settings.max_tokens:
            return _error(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens}")
        return max_tokens

    def rows_of(body: OpenAIBody, prompt: list[int], max_tokens: int, on_text=None) -> list[RowRequest]:
        stops = tuple(body.stops())
        return [
            RowRequest(
                prompt,
                max_tokens,
                stops,
                None if on_text is None else on_text(i),
                sampling=body.sampling(i),
                ignore_eos=body.ignore_eos,
                adapter=models[body.model].adapter,
                logprobs=logprobs_asked(body, isinstance(body, ChatBody)),
            )
            for i in range(body.n or 1)
        ]

    async def respond(request: Request, body: OpenAIBody, prompt: list[int], max_tokens: int, kind: str):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return stream(request, body, prompt, max_tokens, kind, rid)
        try:
            results = await Generation(backend, request, rows_of(body, prompt, max_tokens), settings.timeout_s).wait()
        except REFUSED as e:
            return _refusal(e, settings)
        state["served"] += 1
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(r.logprobs),
                "finish_reason": r.finish_reason,
            }
            if kind == "chat"
            else {"index": i, "text": r.text, "logprobs": text_logprobs(r.logprobs), "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
        return {
            "id": rid,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": choices,
            "usage": usage(prompt, results),
        }

    def usage(prompt: list[int], results: list[RowResult]) -> dict:
        n = sum(r.tokens for r in results)
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

    def stream(request: Request, body: OpenAIBody, prompt: list[int], max_tokens: int, kind: str, rid: str):
        pieces: asyncio.Queue = asyncio.Queue()
        created, obj = int(time.time()), "chat.completion.chunk" if kind == "chat" else "text_completion"
        try:  # admitted before the stream starts, while a status code can still refuse it
            generation = Generation(
                backend,
                request,
                rows_of(body, prompt, max_tokens, lambda i: lambda piece: pieces.put_nowait((i, piece))),
                settings.timeout_s,
            )
        except QueueFull as e:
            return _refusal(e, settings)

        def event(choices: list[dict], **extra) -> str:
            chunk = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": choices}
            return f"data: {json.dumps(chunk | extra, ensure_ascii=False)}\n\n"

        def choice(i: int, delta: str | None, reason: str | None = None, first: bool = False) -> dict:
            if kind == "chat":
                d = ({"role": "assistant", "content": ""} if first else {}) | ({"content": delta} if delta else {})
                return {"index": i, "delta": d, "finish_reason": reason}
            return {"index": i, "text": delta or "", "logprobs": None, "finish_reason": reason}

        async def events():
            waiting = asyncio.ensure_future(generation.wait())
            try:
                if kind == "chat":
                    yield event([choice(i, None, first=True) for i in range(body.n or 1)])
                while True:
                    getter = asyncio.ensure_future(pieces.get())
                    done, _ = await asyncio.wait({getter, waiting}, return_when="FIRST_COMPLETED")
                    if getter not in done:
                        getter.cancel()
                        break
                    yield event([choice(*getter.result())])
                while not pieces.empty():
                    yield event([choice(*pieces.get_nowait())])
                try:
                    results = waiting.result()
                except REFUSED as e:  # the status was sent: the error goes in the stream, then it ends
                    yield f"data: {_refusal(e, settings).body.decode()}\n\n"
                    return
                state["served"] += 1
                for i, r in enumerate(results):
                    yield event([choice(i, None, r.finish_reason)])
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield event([], usage=usage(prompt, results))
                yield "data: [DONE]\n\n"
            finally:  # the client left (the generator is closed or cancelled): stop generating for it
                generation.stop()
                waiting.cancel()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request, CompletionBody)
        if isinstance(body, JSONResponse):
            return body
        max_tokens = check(body)
        if isinstance(max_tokens, JSONResponse):
            return max_tokens
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            return _error(400, "prompt must be one string")
        try:
            ids = await off_loop(completion_prompt, models[body.model].predictor, prompts[0])
        except InputError as e:
            return _error(400, str(e))
        return await respond(request, body, ids, max_tokens, "completion")

    def completion_prompt(prompts: Predictor, text: str) -> list[int]:
        from mentalglm.data.formats import visible

        ids = prompts.text_prompt(text) if visible(text) else []
        return prompts.check_length(ids, settings.max_prompt_tokens, "serve.max_prompt_tokens")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request, ChatBody)
        if isinstance(body, JSONResponse):
            return body
        max_tokens = check(body)
        if isinstance(max_tokens, JSONResponse):
            return max_tokens
        for i, m in enumerate(body.messages):
            if part := m.non_text_part():
                return _error(400, f"messages.{i}.content: a {part!r} part; this server reads text parts only")
        try:
            ids = await off_loop(chat_prompt, models[body.model].predictor, body)
        except InputError as e:
            return _error(400, str(e))
        return await respond(request, body, ids, max_tokens, "chat")

    def chat_prompt(prompts: Predictor, body: ChatBody) -> list[int]:
        from mentalglm.data.formats import visible

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if not any(m["role"] == "user" and visible(m["content"]) for m in messages):
            raise InputError("messages: no user turn with content")
        ids = prompts.messages_prompt(messages)
        return prompts.check_length(ids, settings.max_prompt_tokens, "serve.max_prompt_tokens")

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await _body(request, ClassifyBody)
        if isinstance(body, JSONResponse):
            return body
        name = body.model or settings.model_name
        if name not in models:
            return unknown(name)
        served = models[name]
        max_tokens = capped(body.max_tokens or min(settings.max_tokens, served.predictor.generation.max_new_tokens))
        if isinstance(max_tokens, JSONResponse):
            return max_tokens
        try:
            task = served.predictor.task(body.task)
            ids, _ = await off_loop(lambda: served.predictor.post_prompt(task, body.text, body.aspect, truncate=False))
        except InputError as e:
            return _error(400, str(e))
        try:
            row = RowRequest(ids, max_tokens, sampling=body.sampling(), adapter=served.adapter)
            (result,) = await Generation(backend, request, [row], settings.timeout_s).wait()
        except REFUSED as e:
            return _refusal(e, settings)
        state["served"] += 1
        answer: dict[str, Any] = read(task, result.text).as_dict(task)
        # Label likelihoods (scores.enabled, hf backend): one forward over the prompt and the label sentences.
        scores = (await asyncio.to_thread(served.predictor.label_scores, [task.name], [ids]))[0]
        return {
            **answer,
            "aspect": body.aspect or "",
            "task_name": task.display_name,
            "scores": scores,
            "finish_reason": result.finish_reason,
            "notice": NOTICE,
            "model": name,
        }

    app.state.counters = state
    guarded = Guard(app, api_key=api_key, max_body_bytes=settings.max_body_bytes)
    guarded.state = app.state  # type: ignore[attr-defined]
    return guarded
