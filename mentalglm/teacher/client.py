"""An OpenAI-compatible chat API, called the way a long data-building run needs: bounded concurrency, retries
with exponential backoff and jitter (honouring `Retry-After`), request- and token-per-minute limits, a timeout
per request, and token usage counted.

The official `openai` client sends the requests; its own retries are off (`max_retries=0`) so every retry is
counted here and reported. Errors a retry cannot mend (a wrong key, an unknown model, an exhausted quota, an
unreachable server after the retries) end the run with one `TeacherError` line.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from urllib.parse import urlparse

from mentalglm.config import TeacherConfig
from mentalglm.errors import UserError
from mentalglm.network import is_loopback_host
from mentalglm.tracking import check_env_name


class TeacherError(UserError):
    """The teacher API cannot be used as configured (unreachable, refused, unknown model, quota)."""


def is_loopback(base_url: str) -> bool:
    try:
        host = urlparse(base_url).hostname
    except ValueError:  # a malformed URL (an unclosed "[") is no address on this machine
        return False
    return is_loopback_host(host)


def check_destination(cfg: TeacherConfig) -> None:
    """Posts leave this machine only when the user says so."""
    if not is_loopback(cfg.base_url) and not cfg.allow_remote:
        host = urlparse(cfg.base_url).hostname or cfg.base_url
        raise TeacherError(
            f"teacher.base_url={cfg.base_url} is not on this machine: the posts would be sent to {host}; "
            "set teacher.allow_remote=true to allow it"
        )


def api_key(cfg: TeacherConfig) -> str:
    """The key from the environment variable the config names (never from a file a run writes)."""
    if not cfg.api_key_env:
        return "none"
    check_env_name("teacher.api_key_env", cfg.api_key_env)
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    if is_loopback(cfg.base_url):
        return "none"  # a local server usually needs no key
    raise TeacherError(f"teacher.api_key_env={cfg.api_key_env}: the environment variable is not set")


@dataclass
class Reply:
    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: Counter = field(default_factory=Counter)  # reason -> count

    def add(self, reply: Reply) -> None:
        self.requests += 1
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens

    def cost(self, cfg: TeacherConfig) -> float:
        return (
            self.prompt_tokens * cfg.price_per_million_input + self.completion_tokens * cfg.price_per_million_output
        ) / 1e6

    def as_dict(self, cfg: TeacherConfig) -> dict:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "estimated_cost": round(self.cost(cfg), 6),
            "currency": cfg.currency,
            "retries": dict(sorted(self.retries.items())),
        }


def sampling_settings(cfg: TeacherConfig) -> dict:
    """What decides an answer beside the prompt: part of every cache key."""
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed, "max_tokens": cfg.max_tokens}


class RateLimiter:
    """Requests and tokens per minute over a sliding 60-second window. A request reserves its estimated tokens
    (prompt characters / 2 + max_tokens) before it is sent; the reservation is corrected by the reported usage."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, window_s: float = 60.0):
        self.rpm, self.tpm, self.window = requests_per_minute, tokens_per_minute, window_s
        self.events: deque[list] = deque()  # [time, tokens]
        self.lock = asyncio.Lock()

    def _prune(self, now: float) -> None:
        while self.events and now - self.events[0][0] >= self.window:
            self.events.popleft()

    async def acquire(self, tokens: int) -> list:
        if self.tpm is not None:
            tokens = min(tokens, self.tpm)  # a request larger than the budget still goes, alone in its window
        while True:
            async with self.lock:
                now = time.monotonic()
                self._prune(now)
                used = sum(e[1] for e in self.events)
                if (self.rpm is None or len(self.events) < self.rpm) and (
                    self.tpm is None or used + tokens <= self.tpm
                ):
                    event = [now, tokens]
                    self.events.append(event)
                    return event
                wait = self.window - (now - self.events[0][0]) if self.events else 0.05
            await asyncio.sleep(max(wait, 0.01))

    @staticmethod
    def settle(event: list, tokens: int) -> None:
        event[1] = tokens


def retry_after(error) -> float | None:
    """Seconds from a `Retry-After` header (seconds or an HTTP date), if the error carries one."""
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None


class TeacherClient:
    """`await client.chat(messages)` -> Reply, under the limits of `cfg`; at most `cfg.concurrency` in flight."""

    def __init__(self, cfg: TeacherConfig):
        import logging

        from openai import AsyncOpenAI

        check_destination(cfg)
        for name in ("httpx", "httpx2", "openai"):  # one line per request otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
        self.cfg = cfg
        self.client = AsyncOpenAI(base_url=cfg.base_url, api_key=api_key(cfg), max_retries=0, timeout=cfg.timeout_s)
        self.slots = asyncio.Semaphore(cfg.concurrency)
        self.limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
        self.usage = Usage()
        self.fatal: TeacherError | None = None  # once set, no further request is sent

    async def chat(self, messages: list[dict]) -> Reply:
        try:
            return await self._chat(messages)
        except TeacherError as e:
            self.fatal = self.fatal or e
            raise

    def settings(self) -> dict:
        return sampling_settings(self.cfg)

    async def close(self) -> None:
        await self.client.close()

    def _delay(self, attempt: int, error=None) -> float:
        hinted = retry_after(error) if error is not None else None
        if hinted is not None:
            return min(hinted, self.cfg.max_backoff_s)
        base = min(self.cfg.backoff_s * 2**attempt, self.cfg.max_backoff_s)
        return base * (0.5 + random.random() / 2)  # jitter: retries of many requests do not arrive together

    async def _chat(self, messages: list[dict]) -> Reply:
        import openai

        c = self.cfg
        estimate = sum(len(m["content"]) for m in messages) // 2 + c.max_tokens
        attempt = 0
        while True:
            reason = None
            async with self.slots:
                if self.fatal is not None:
                    raise self.fatal
                event = await self.limiter.acquire(estimate)
                try:
                    # The client's timeout bounds each read; wait_for bounds the whole request (a drip-fed body too).
                    response = await asyncio.wait_for(
                        self.client.chat.completions.create(
                            model=c.model,
                            messages=messages,
                            temperature=c.temperature,
                            top_p=c.top_p,
                            max_tokens=c.max_tokens,
                            **({"seed": c.seed} if c.seed is not None else {}),
                        ),
                        timeout=c.timeout_s,
                    )
                except openai.AuthenticationError:
                    raise TeacherError(
                        f"teacher at {c.base_url} refused the key (401): check ${c.api_key_env}"
                    ) from None
                except openai.PermissionDeniedError as e:
                    raise TeacherError(f"teacher at {c.base_url} denied access (403): {_message(e)}") from None
                except openai.NotFoundError as e:
                    raise TeacherError(
                        f"teacher at {c.base_url}: model {c.model!r} not found (404): {_message(e)}; "
                        "check teacher.model and teacher.base_url"
                    ) from None
                except openai.RateLimitError as e:
                    if _quota_exhausted(e):
                        raise TeacherError(
                            f"teacher at {c.base_url}: quota exhausted (429; {_message(e)}); "
                            "rerun when it is restored: answers so far are kept"
                        ) from None
                    reason, error = "429", e
                except openai.APIStatusError as e:
                    if e.status_code < 500 and e.status_code not in (408, 409):
                        raise TeacherError(
                            f"teacher at {c.base_url} rejected the request ({e.status_code}): {_message(e)}"
                        ) from None
                    reason, error = str(e.status_code), e
                except (openai.APITimeoutError, asyncio.TimeoutError) as e:
                    reason, error = "timeout", e
                except openai.APIConnectionError as e:
                    reason, error = "connection", e
                except (openai.APIResponseValidationError, ValueError) as e:  # ValueError: a body that is not JSON
                    reason, error = "malformed response", e
                if reason is None:
                    reply = _reply(response)
                    if reply is None:
                        reason, error = "malformed response", None
                    else:
                        RateLimiter.settle(event, reply.prompt_tokens + reply.completion_tokens)
                        self.usage.add(reply)
                        return reply
            self.usage.retries[reason] += 1
            if attempt >= c.max_retries:
                raise TeacherError(
                    f"teacher at {c.base_url}: gave up after {attempt + 1} attempts ({reason}); answers so far "
                    "are kept, rerun to continue"
                )
            await asyncio.sleep(self._delay(attempt, error))
            attempt += 1


def _message(error) -> str:
    """What a teacher's error says, reduced to a hash: its text may quote the prompt, and with it a post."""
    import hashlib

    body = getattr(error, "body", None)
    inner = body.get("error", body) if isinstance(body, dict) else None
    text = str(inner.get("message")) if isinstance(inner, dict) and inner.get("message") else str(error)
    return f"its message withheld (it may quote a post), sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _quota_exhausted(error) -> bool:
    body = getattr(error, "body", None)
    inner = body.get("error", body) if isinstance(body, dict) else None
    code = inner.get("code") if isinstance(inner, dict) else None
    return code == "insufficient_quota"


def _reply(response) -> Reply | None:
    """The first choice, or None when the server answered 200 without one (counted and retried)."""
    choices = getattr(response, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
        return None
    usage = getattr(response, "usage", None)
    return Reply(
        content=choices[0].message.content or "",
        finish_reason=choices[0].finish_reason,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
    )
