"""A client library calling a running serve.py, in a process of its own (as a user's script would):
`python tests/client_calls.py LIBRARY BASE_URL KEY` prints one JSON line {chat, stream, sampled, sampled_again}.

LIBRARY: openai (sync), openai_async, langchain (ChatOpenAI with its defaults), litellm (completion with
model="openai/<id>"). Each asks the same post three ways: plain, streamed, and sampled (temperature 0.7, seed 7).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

MODEL = "mentalglm"
POST = "最近总是失眠，觉得活着很累。"
MESSAGES = [{"role": "user", "content": POST}]


def with_openai(url: str, key: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)

    def ask(**kw):
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, **kw)

    stream = ask(stream=True)
    return {
        "chat": ask().choices[0].message.content,
        "stream": "".join(c.choices[0].delta.content or "" for c in stream if c.choices),
        "sampled": ask(temperature=0.7, seed=7).choices[0].message.content,
        "sampled_again": ask(temperature=0.7, seed=7).choices[0].message.content,
    }


def with_openai_async(url: str, key: str) -> dict:
    from openai import AsyncOpenAI

    async def run():
        client = AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)

        async def ask(**kw):
            return await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, **kw)

        pieces = [c.choices[0].delta.content or "" async for c in await ask(stream=True) if c.choices]
        chat, sampled, again = await asyncio.gather(ask(), ask(temperature=0.7, seed=7), ask(temperature=0.7, seed=7))
        return {
            "chat": chat.choices[0].message.content,
            "stream": "".join(pieces),
            "sampled": sampled.choices[0].message.content,
            "sampled_again": again.choices[0].message.content,
        }

    return asyncio.run(run())


def with_langchain(url: str, key: str) -> dict:
    from langchain_openai import ChatOpenAI

    plain = ChatOpenAI(model=MODEL, base_url=url, api_key=key, max_tokens=24, max_retries=0)  # its defaults
    sampled = ChatOpenAI(model=MODEL, base_url=url, api_key=key, max_tokens=24, temperature=0.7, seed=7)
    return {
        "chat": plain.invoke(POST).content,
        "stream": "".join(chunk.content for chunk in plain.stream(POST)),
        "sampled": sampled.invoke(POST).content,
        "sampled_again": sampled.invoke(POST).content,
    }


def with_litellm(url: str, key: str) -> dict:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price list
    import litellm

    def ask(**kw):
        return litellm.completion(
            model=f"openai/{MODEL}", api_base=url, api_key=key, messages=MESSAGES, max_tokens=24, **kw
        )

    return {
        "chat": ask().choices[0].message.content,
        "stream": "".join(c.choices[0].delta.content or "" for c in ask(stream=True) if c.choices),
        "sampled": ask(temperature=0.7, seed=7).choices[0].message.content,
        "sampled_again": ask(temperature=0.7, seed=7).choices[0].message.content,
    }


LIBRARIES = {
    "openai": with_openai,
    "openai_async": with_openai_async,
    "langchain": with_langchain,
    "litellm": with_litellm,
}

if __name__ == "__main__":
    library, url, key = sys.argv[1:4]
    print(json.dumps(LIBRARIES[library](url, key), ensure_ascii=False))
