"""A scripted OpenAI-compatible teacher for the build_data tests, run as a real process on loopback.

    python tests/teacher_server.py PORT LOG [FAULT,...] [DELAY_S]

It answers /v1/chat/completions the way a good teacher would (the label sentence the prompt asks for, the
marker, an explanation in the prompt's language; a translation; a baseline answer), and injects faults chosen
per prompt (a hash bucket), so counts are deterministic under any concurrency. Every request's prompt hash is
appended to LOG (with the time), so a test counts what the server received; DELAY_S: every answer takes
this long (a remote API's latency). Faults:
  429 500 slow malformed empty   the first request of a bucket of prompts fails that way, the retry succeeds
  truncated disagree unparsed    a bucket of prompts always gets that answer
  drip                           the first request of a bucket gets its body one byte every 0.25 s
  japanese                       a bucket of prompts always gets its explanation in Japanese
  auth quota quote400            every request: 401 / 429 insufficient_quota / 400 quoting the prompt
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import time
from collections import Counter

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

PORT, LOG = int(sys.argv[1]), sys.argv[2]
FAULTS = set(filter(None, (sys.argv[3] if len(sys.argv) > 3 else "").split(",")))
DELAY_S = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
MODEL = "teacher"
SLOW_S = 3.0
attempts: Counter = Counter()
app = FastAPI()

BUCKETS = {"429": 0, "500": 1, "slow": 2, "malformed": 3, "empty": 4, "drip": 9}  # first attempt only, hash % 11
ALWAYS = {"truncated": 5, "disagree": 6, "unparsed": 7, "japanese": 8}  # hash % 11


def reply(content: str, finish: str = "stop") -> JSONResponse:
    return JSONResponse(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        }
    )


def answer(prompt: str) -> str:
    if m := re.search(r"先原样写出“(.+?)”，接着写“(.+?)”", prompt):
        return f"{m.group(1)}{m.group(2)}帖子中的表述支持这一判断。"
    if m := re.search(r'first write "(.+?)" exactly, then "(.+?)"', prompt):
        return f"{m.group(1)} {m.group(2)} The wording of the post supports this label."
    if "翻译成简体中文" in prompt:
        return f"这是一段译文，原文共有{len(prompt)}个字符。"
    if m := re.search(r"请从以下标签中选择：(.+?)。", prompt):
        return f"{m.group(1).split('、')[0]}。推理：根据帖子内容判断。"
    return "我无法回答。"


def wrong(prompt: str) -> str:
    """A teacher that states another label than the gold one."""
    swaps = [("高自杀风险", "低自杀风险"), ("Yes, the poster", "No, the poster does not")]
    text = answer(prompt)
    for a, b in swaps:
        if a in text:
            return text.replace(a, b)
        if b in text:
            return text.replace(b, a)
    return "该帖子的发布者有低自杀风险。推理：看不出风险。" if "推理" in text else text


@app.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    prompt = "\n".join(m["content"] for m in body["messages"])
    sha = hashlib.sha256(prompt.encode()).hexdigest()
    with open(LOG, "a") as f:
        f.write(f"{sha} {time.time():.3f}\n")
    attempts[sha] += 1
    if DELAY_S:
        await asyncio.sleep(DELAY_S)
    first = attempts[sha] == 1
    bucket = int(sha, 16) % 11
    if "auth" in FAULTS:
        return JSONResponse({"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}, 401)
    if "quote400" in FAULTS:  # like some APIs, an error that quotes what it was sent
        return JSONResponse({"error": {"message": f"Invalid content in request: {prompt[-300:]}"}}, 400)
    if "quota" in FAULTS:
        return JSONResponse({"error": {"message": "You exceeded your quota", "code": "insufficient_quota"}}, 429)
    if body.get("model") != MODEL:
        return JSONResponse({"error": {"message": f"The model {body.get('model')} does not exist"}}, 404)
    fault = next((f for f, b in BUCKETS.items() if f in FAULTS and b == bucket), None)
    if first and fault == "429":
        return JSONResponse({"error": {"message": "Rate limit reached"}}, 429, headers={"Retry-After": "1"})
    if first and fault == "500":
        return JSONResponse({"error": {"message": "internal error"}}, 500)
    if first and fault == "slow":
        await asyncio.sleep(SLOW_S)
    if first and fault == "malformed":
        return PlainTextResponse('{"id": "x", "choices": [', media_type="application/json")
    if first and fault == "empty":
        return reply("")
    if first and fault == "drip":

        async def drip():
            for byte in b'{"id": "x", "object": "chat.completion", "choices": []}':
                yield bytes([byte])
                await asyncio.sleep(0.25)

        return StreamingResponse(drip(), media_type="application/json")
    always = next((f for f, b in ALWAYS.items() if f in FAULTS and b == bucket), None)
    if always == "truncated":
        return reply(answer(prompt)[:12], "length")
    if always == "disagree":
        return reply(wrong(prompt))
    if always == "japanese" and (m := re.search(r"先原样写出“(.+?)”，接着写“(.+?)”", prompt)):
        return reply(f"{m.group(1)}{m.group(2)}投稿の表現はこの判断を支持しています。とても疲れているようです。")
    if always == "unparsed":
        return reply("这个问题很难回答。\r帖子里没有说。")  # a bare CR: the sheet must quote it or it ends the row
    return reply(answer(prompt))


@app.get("/ready")
async def ready():
    return {"ok": True}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
