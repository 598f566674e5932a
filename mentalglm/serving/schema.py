"""The request bodies serve.py reads, as the OpenAI API defines them, and how a body becomes rows to generate.

Types are strict (`"max_tokens": true` is not 1, `"temperature": "0.7"` is not a number); fields OpenAI defines
that this server cannot honour are refused by name (`UNSUPPORTED`), never silently ignored; fields it does not
know are ignored, as OpenAI's server does. Temperature defaults to 0 here (greedy, reproducible), not OpenAI's 1.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mentalglm.runtime.generation import Sampling


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: str


class SamplingFields(BaseModel):
    # strict: a float field takes an int or a float, never a bool or a string
    model_config = ConfigDict(extra="ignore", strict=True)

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # an extension (vLLM's): -1 or 0 for every token
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)

    def sampling(self, choice: int = 0) -> Sampling:
        """The sampling of choice `choice` (of n): seeded requests give choice i the seed + i, so each choice
        differs and every one is reproducible; unseeded, each row draws a fresh seed where it is generated."""
        seed = self.seed
        return Sampling(
            temperature=float(self.temperature or 0.0),
            top_p=float(1.0 if self.top_p is None else self.top_p),
            top_k=max(self.top_k or 0, 0),
            seed=None if seed is None else seed + choice,
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0),
        )


class OpenAIBody(SamplingFields):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate to the cap
    response_format: ResponseFormat | None = None
    # chat: logprobs true (+ top_logprobs 0-20); completions: logprobs 0-20 (the number of alternatives)
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Defined by OpenAI, not available here: refused by name when set (see UNSUPPORTED).
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# field -> values that ask for nothing (OpenAI's defaults), anything else is refused with a 400 naming the field
UNSUPPORTED = {
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


def logprobs_asked(body: OpenAIBody, chat: bool) -> int | None | str:
    """How many alternatives per token the request asks logprobs for (None: no logprobs), or the error."""
    if chat:
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            return "logprobs: true or false in a chat request (top_logprobs gives the number of alternatives)"
        if body.top_logprobs is not None and body.logprobs is not True:
            return "top_logprobs needs logprobs: true"
        asked = (body.top_logprobs or 0) if body.logprobs else None
    else:
        if isinstance(body.logprobs, bool) or (body.logprobs is not None and not 0 <= body.logprobs <= 20):
            return "logprobs: the number of alternatives per token, 0 to 20, in a completion request"
        asked = body.logprobs
    if asked is not None and body.stream:
        return "logprobs with stream=true is not supported by this server; ask without streaming"
    return asked


def refused_field(body: OpenAIBody) -> str | None:
    """The first field the body sets that this server cannot honour, as an error message."""
    for name, inert in UNSUPPORTED.items():
        value = getattr(body, name)
        if not any(value == v and type(value) is type(v) for v in inert):
            return f"{name} is not supported by this server; leave it out"
    if body.response_format is not None and body.response_format.type != "text":
        return f"response_format type {body.response_format.type!r} is not supported; only 'text'"
    return None


class CompletionBody(OpenAIBody):
    prompt: str | list[str]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text: a string, or its text parts joined (other parts are refused before)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    def non_text_part(self) -> str | None:
        if isinstance(self.content, list):
            return next((p.type for p in self.content if p.type != "text"), None)
        return None


class ChatBody(OpenAIBody):
    messages: list[Message] = Field(min_length=1)


class ClassifyBody(SamplingFields):
    """/v1/classify: greedy unless the request asks for sampling (labels must be reproducible)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    task: str
    text: str
    aspect: str | None = None
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
