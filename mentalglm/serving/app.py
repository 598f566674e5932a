"""The OpenAI-compatible server (FastAPI): /v1/models, /v1/completions, /v1/chat/completions (streaming too),
/v1/classify (post + task -> labels, explanation, scores, notice), /v1/tasks, /health, /ready and the demo page
at /.

Both backends sit behind the same routes: `hf` (the project's batched generation, `DynamicBatcher`) and `vllm`
(a vLLM server the project started, `serving/vllm.py`). Prompts are rendered here, so both see the same token
ids. The server holds under load and bad input: bodies are validated (4xx with a message), max_tokens is
capped, a full queue answers 503 with Retry-After, each request has a timeout, a client that goes away cancels
its generation, an API key is required off loopback, request text is never logged, and shutdown finishes the
requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mentalglm.config import ServeSettings
from mentalglm.serving.batcher import Cancelled, DynamicBatcher, QueueFull
from mentalglm.serving.predictor import NOTICE, InputError, Predictor, read

log = logging.getLogger("mentalglm.serve")


# ----------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields a greedy server need not read

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False


class CompletionBody(_Body):
    prompt: str | list[str]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    text: str
    aspect: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)


# ----------------------------------------------------------------------------- backends
class HFBackend:
    name = "hf"

    def __init__(self, predictor: Predictor, settings: ServeSettings):
        self.predictor = predictor
        self.batcher = DynamicBatcher(
            predictor.model,
            predictor.tokenizer,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
        )

    async def generate(
        self, prompt: list[int], max_tokens: int, stop: list[str], cancelled: threading.Event, on_text=None
    ) -> str:
        from mentalglm.runtime.generation import RowRequest

        loop = asyncio.get_running_loop()
        push = None if on_text is None else (lambda piece: loop.call_soon_threadsafe(on_text, piece))
        future = self.batcher.submit(RowRequest(prompt, max_tokens, tuple(stop), push, cancelled.is_set))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self.batcher.close()


class VLLMBackend:
    name = "vllm"

    def __init__(self, predictor: Predictor, client, settings: ServeSettings):
        self.predictor, self.client = predictor, client
        self.queue_size, self.gate = settings.queue_size, asyncio.Semaphore(settings.max_batch_size * 4)
        self.waiting = 0

    async def generate(
        self, prompt: list[int], max_tokens: int, stop: list[str], cancelled: threading.Event, on_text=None
    ) -> str:
        if self.waiting >= self.queue_size:
            raise QueueFull()
        self.waiting += 1
        try:
            await self.gate.acquire()
        finally:
            self.waiting -= 1
        try:
            if cancelled.is_set():
                raise Cancelled()
            return await self.client.complete(prompt, max_tokens, stop, on_text)
        finally:
            self.gate.release()

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- the app
def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers
    )


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def create_app(backend, settings: ServeSettings, *, api_key: str | None = None) -> FastAPI:
    predictor: Predictor = backend.predictor
    tokenizer = predictor.tokenizer
    state = {"ready": True, "in_flight": 0, "served": 0}
    prompt_limit = (settings.max_prompt_tokens, "serve.max_prompt_tokens")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # Shutdown: uvicorn has stopped accepting and let the requests in flight finish.
        state["ready"] = False
        backend.close()

    app = FastAPI(title="MentalGLM", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        if api_key and path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {api_key}":
                log.info("%s %s 401", request.method, path)
                return _error(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error")
        response = await call_next(request)
        # Never the body: posts about suicide do not belong in a server log.
        log.info("%s %s %d %.0f ms", request.method, path, response.status_code, 1000 * (time.perf_counter() - start))
        return response

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
    async def models():
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "mentalglm"}],
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
    def check(body: _Body) -> tuple[int, list[str]] | JSONResponse:
        if body.model != settings.model_name:
            return _error(
                404,
                f"model {body.model!r} does not exist; this server serves {settings.model_name!r}",
                "not_found_error",
            )
        if body.temperature not in (None, 0, 0.0):
            return _error(400, "this server decodes greedily: temperature must be 0 (or left out)")
        if body.n not in (None, 1):
            return _error(400, "n must be 1")
        max_tokens = body.max_tokens or settings.max_tokens
        if max_tokens > settings.max_tokens:
            return _error(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens}")
        return max_tokens, _stops(body.stop)

    async def run(request: Request, prompt: list[int], max_tokens: int, stop: list[str], on_text=None) -> str:
        """Generate one answer under the request's timeout, cancelled when the client goes away."""
        cancelled = threading.Event()
        task = asyncio.ensure_future(backend.generate(prompt, max_tokens, stop, cancelled, on_text))
        state["in_flight"] += 1
        try:
            deadline = time.monotonic() + settings.timeout_s
            while not task.done():
                await asyncio.wait({task}, timeout=0.2)
                if task.done():
                    break
                if await request.is_disconnected():
                    cancelled.set()
                    task.cancel()
                    raise Cancelled()
                if time.monotonic() > deadline:
                    cancelled.set()
                    task.cancel()
                    raise TimeoutError()
            return task.result()
        finally:
            state["in_flight"] -= 1

    def finish_reason(text: str, max_tokens: int) -> str:
        return "length" if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= max_tokens else "stop"

    def usage(prompt: list[int], text: str) -> dict:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

    async def respond(request: Request, prompt: list[int], max_tokens: int, stop: list[str], stream: bool, kind: str):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not stream:
            try:
                text = await run(request, prompt, max_tokens, stop)
            except QueueFull:
                return _error(
                    503,
                    "the server is busy: too many requests are waiting",
                    "unavailable",
                    {"Retry-After": str(settings.retry_after_s)},
                )
            except TimeoutError:
                return _error(504, f"generation took longer than {settings.timeout_s:g} s", "timeout")
            except Cancelled:
                return _error(499, "the client closed the connection", "cancelled")
            state["served"] += 1
            reason = finish_reason(text, max_tokens)
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                if kind == "chat"
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            )
            return {
                "id": rid,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created,
                "model": settings.model_name,
                "choices": [choice],
                "usage": usage(prompt, text),
            }
        return await stream_response(request, prompt, max_tokens, stop, kind, rid, created)

    async def stream_response(request, prompt, max_tokens, stop, kind, rid, created):
        pieces: asyncio.Queue = asyncio.Queue()
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: str | None, reason: str | None = None, first: bool = False) -> str:
            if kind == "chat":
                d = ({"role": "assistant", "content": ""} if first else {}) | ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            body = {"id": rid, "object": obj, "created": created, "model": settings.model_name, "choices": [choice]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        worker = asyncio.ensure_future(run(request, prompt, max_tokens, stop, pieces.put_nowait))
        # A full queue is refused before the stream starts, while a status code can still say so.
        await asyncio.wait({worker}, timeout=0.01)
        if worker.done() and isinstance(worker.exception(), QueueFull):
            return _error(
                503,
                "the server is busy: too many requests are waiting",
                "unavailable",
                {"Retry-After": str(settings.retry_after_s)},
            )

        async def events():
            if kind == "chat":
                yield chunk(None, first=True)
            try:
                while True:
                    getter = asyncio.ensure_future(pieces.get())
                    done, _ = await asyncio.wait({getter, worker}, return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        yield chunk(getter.result())
                        continue
                    getter.cancel()
                    while not pieces.empty():
                        yield chunk(pieces.get_nowait())
                    break
                text = worker.result()
                state["served"] += 1
                yield chunk(None, finish_reason(text, max_tokens))
                yield "data: [DONE]\n\n"
            except (Cancelled, asyncio.CancelledError):
                worker.cancel()
                raise
            except (TimeoutError, QueueFull) as e:
                message = "timeout" if isinstance(e, TimeoutError) else "busy"
                yield f"data: {json.dumps({'error': {'message': message}})}\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def body_of(request: Request, model):
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"the body is not JSON ({getattr(e, 'msg', e)})")
        try:
            return model.model_validate(raw)
        except Exception as e:  # pydantic.ValidationError
            errors = getattr(e, "errors", lambda: [])()
            problems = [
                f"{'.'.join(str(p) for p in err.get('loc', ())) or 'body'}: {err.get('msg')}" for err in errors[:5]
            ]
            return _error(400, "invalid request: " + ("; ".join(problems) or str(e)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, CompletionBody)
        if isinstance(body, JSONResponse):
            return body
        checked = check(body)
        if isinstance(checked, JSONResponse):
            return checked
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            return _error(400, "prompt must be one string")
        try:
            ids = predictor.check_length(predictor.text_prompt(prompts[0]) if prompts[0].strip() else [], *prompt_limit)
        except InputError as e:
            return _error(400, str(e))
        return await respond(request, ids, *checked, body.stream, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request, ChatBody)
        if isinstance(body, JSONResponse):
            return body
        checked = check(body)
        if isinstance(checked, JSONResponse):
            return checked
        if not any(m.role == "user" and m.content.strip() for m in body.messages):
            return _error(400, "messages: no user turn with content")
        try:
            ids = predictor.check_length(
                predictor.messages_prompt([m.model_dump() for m in body.messages]), *prompt_limit
            )
        except InputError as e:
            return _error(400, str(e))
        return await respond(request, ids, *checked, body.stream, "chat")

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await body_of(request, ClassifyBody)
        if isinstance(body, JSONResponse):
            return body
        max_tokens = body.max_tokens or min(settings.max_tokens, predictor.generation.max_new_tokens)
        if max_tokens > settings.max_tokens:
            return _error(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens}")
        try:
            task = predictor.task(body.task)
            ids, _ = predictor.post_prompt(task, body.text, body.aspect, truncate=False)
        except InputError as e:
            return _error(400, str(e))
        try:
            text = await run(request, ids, max_tokens, [])
        except QueueFull:
            return _error(
                503,
                "the server is busy: too many requests are waiting",
                "unavailable",
                {"Retry-After": str(settings.retry_after_s)},
            )
        except TimeoutError:
            return _error(504, f"generation took longer than {settings.timeout_s:g} s", "timeout")
        except Cancelled:
            return _error(499, "the client closed the connection", "cancelled")
        state["served"] += 1
        result: dict[str, Any] = read(task, text).as_dict(task)
        # Label likelihoods (scores.enabled, hf backend): one forward over the prompt and the label sentences.
        scores = (await asyncio.to_thread(predictor.label_scores, [task.name], [ids]))[0]
        return {
            **result,
            "aspect": body.aspect or "",
            "task_name": task.display_name,
            "scores": scores,
            "notice": NOTICE,
            "model": settings.model_name,
        }

    app.state.counters = state
    return app
