"""serve.py (hf backend) as a real process on 127.0.0.1, called over real HTTP with the official openai client:
the OpenAI routes, /v1/classify, batching under concurrency, a full queue, disconnects, bad requests, the API key,
graceful shutdown, and no post text in the server's log."""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from conftest import ROOT
from serving import MODEL, Server, make_adapter

pytestmark = pytest.mark.slow
MARKER = "独一无二的标记帖子内容XYZ-7731"  # a post that must never reach a log
PROMPTS = [f"帖子{i}：最近压力很大，睡不着。" if i % 2 else f"Post {i}: I feel tired and alone." for i in range(16)]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, cli_cache):
    return make_adapter(cli_cache, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def server(tmp_path_factory, cli_cache, adapter):
    srv = Server(
        tmp_path_factory.mktemp("serve"),
        cli_cache,
        adapter,
        "data.max_length=128",
        "serve.max_prompt_tokens=128",  # chat and completion prompts: their own cap
        "serve.max_tokens=64",
        "serve.max_batch_size=8",
        "serve.max_wait_ms=20",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def completion(client, prompt: str, max_tokens: int = 16) -> str:
    return (
        client.completions.create(model="mentalglm", prompt=prompt, max_tokens=max_tokens, temperature=0)
        .choices[0]
        .text
    )


def test_models_chat_completion_streaming_and_classify(server, client):
    assert [m.id for m in client.models.list().data] == ["mentalglm"]
    messages = [{"role": "user", "content": PROMPTS[1]}]
    chat = client.chat.completions.create(model="mentalglm", messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0
    streamed = client.chat.completions.create(model="mentalglm", messages=messages, max_tokens=16, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == chat.choices[0].message.content
    text = completion(client, PROMPTS[0])
    stream = client.completions.create(model="mentalglm", prompt=PROMPTS[0], max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in stream) == text

    r = httpx.post(
        server.url + "/v1/classify", json={"task": "socialcd_3k", "text": "我就是个废物，都是我的错"}, timeout=120
    )
    body = r.json()
    assert r.status_code == 200 and body["task"] == "socialcd_3k" and isinstance(body["labels"], list)
    assert "screening" in body["notice"] and "diagnos" in body["notice"] and body["scores"] is None
    assert {"explanation", "parsed", "output", "label_names"} <= set(body)
    tasks = httpx.get(server.url + "/v1/tasks").json()["tasks"]
    assert {"sos_hl_1k", "socialcd_3k", "cp", "irf"} <= {t["name"] for t in tasks}
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/classify" in page.text and "http" not in page.text.split("<script>")[0]


def test_greedy_answers_equal_predict(server, tmp_path, run_cli, adapter):
    post = "最近总是失眠，觉得活着很累。"
    r = httpx.post(server.url + "/v1/classify", json={"task": "sos_hl_1k", "text": post, "max_tokens": 64}, timeout=120)
    out = tmp_path / "pred.jsonl"
    run_cli(
        "predict.py",
        *MODEL,
        f"adapter={adapter}",
        "task=sos_hl_1k",
        f"text='{post}'",
        f"output={out}",
        "data.max_length=128",
        "generation.max_new_tokens=64",
    )
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row["output"] == r.json()["output"] and row["labels"] == r.json()["labels"]
    assert post not in out.read_text(encoding="utf-8")  # the post itself is not written


def test_concurrent_requests_equal_sequential_answers(client):
    sequential = {p: completion(client, p) for p in PROMPTS}
    work = [PROMPTS[i % len(PROMPTS)] for i in range(200)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda p: completion(client, p), work))
    assert answers == [sequential[p] for p in work]  # 200 requests, 0 errors, each its sequential answer


def test_disconnect_mid_stream_leaves_the_server_healthy(server, client):
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        timeout=120,
        json={"model": "mentalglm", "prompt": PROMPTS[3], "max_tokens": 64, "stream": True},
    ) as r:
        next(r.iter_lines())  # the first event, then the client goes away
    time.sleep(0.5)
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert completion(client, PROMPTS[3], 8)


@pytest.mark.parametrize(
    "path,body,status,message",
    [
        ("/v1/completions", "{not json", 400, "not JSON"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
        ("/v1/completions", {"model": "mentalglm", "prompt": "   "}, 400, "empty"),
        (
            "/v1/completions",
            {"model": "mentalglm", "prompt": "很长的帖子。" * 200},
            400,
            "128 (serve.max_prompt_tokens)",
        ),
        ("/v1/completions", {"model": "mentalglm", "prompt": "hi", "max_tokens": 10_000}, 400, "at most 64"),
        ("/v1/completions", {"model": "mentalglm", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "mentalglm", "prompt": "hi", "temperature": 3}, 400, "temperature"),
        ("/v1/completions", {"model": "mentalglm", "prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
        ("/v1/completions", {"model": "mentalglm", "prompt": "hi", "temperature": "0.7"}, 400, "temperature"),
        (
            "/v1/completions",
            {"model": "mentalglm", "prompt": "hi", "tools": [{"type": "function"}]},
            400,
            "tools is not",
        ),
        ("/v1/completions", {"model": "mentalglm", "prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias"),
        ("/v1/completions", {"model": "mentalglm", "prompt": "hi", "n": 99}, 400, "at most 8 (serve.max_choices)"),
        (
            "/v1/completions",
            {"model": "mentalglm", "prompt": "hi", "max_tokens": 4, "max_completion_tokens": 5},
            400,
            "differ",
        ),
        ("/v1/completions", '{"model": "mentalglm", "prompt": "hi \\ud800"}', 400, "lone surrogate"),
        ("/v1/completions", '{"model": "mentalglm", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "deep"),
        ("/v1/completions", '{"model": "mentalglm", "prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", 400, "JSON"),
        ("/v1/completions", b'{"model": "mentalglm", "prompt": "\xff"}', 400, "not JSON"),
        (
            "/v1/chat/completions",
            {
                "model": "mentalglm",
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_object"},
            },
            400,
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {"model": "mentalglm", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "text parts only",
        ),
        (
            "/v1/chat/completions",
            {"model": "mentalglm", "messages": [{"role": "user", "content": "\u200b\u200d \ufeff"}]},
            400,
            "no user turn",
        ),
        ("/v1/classify", '{"task": "sos_hl_1k", "text": "\\udfff\u597d\u7d2f"}', 400, "lone surrogate"),
        ("/v1/classify", {"task": "sos_hl_1k", "text": "好累", "model": "gpt-4"}, 404, "does not exist"),
        ("/v1/classify", {"task": "sos_hl_1k", "text": "好累", "max_tokens": True}, 400, "max_tokens"),
        ("/v1/completions", {"model": "mentalglm"}, 400, "prompt"),
        ("/v1/chat/completions", {"model": "mentalglm", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "mentalglm", "messages": [{"role": "user", "content": ""}]}, 400, "user"),
        ("/v1/chat/completions", {"model": "mentalglm", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ("/v1/classify", {"task": "nope", "text": "好累"}, 400, "unknown task"),
        ("/v1/classify", {"task": "sos_hl_1k", "text": " \u200b "}, 400, "empty"),
        ("/v1/classify", {"task": "sos_hl_1k", "text": "好累" * 500}, 400, "at most 128"),
        ("/v1/classify", {"task": "irf", "text": "I am a burden."}, 400, "aspect"),
        ("/v1/classify", {"task": "sos_hl_1k", "text": "好累", "extra": 1}, 400, "extra"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(server, path, body, status, message):
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_no_post_text_in_the_server_log(server):
    r = httpx.post(server.url + "/v1/classify", json={"task": "sos_hl_1k", "text": MARKER}, timeout=120)
    assert r.status_code == 200
    httpx.post(
        server.url + "/v1/completions", json={"model": "mentalglm", "prompt": MARKER, "max_tokens": 4}, timeout=120
    )
    time.sleep(0.3)
    logs = server.log.read_text(encoding="utf-8", errors="replace")
    logs += "".join(p.read_text(errors="replace") for p in server.outputs.rglob("*.log"))
    assert "POST /v1/classify 200" in logs and MARKER not in logs and MARKER[:8] not in logs


# ----------------------------------------------------------------------------- a small server: queue, key, shutdown
@pytest.fixture(scope="module")
def small(tmp_path_factory, cli_cache, adapter):
    srv = Server(
        tmp_path_factory.mktemp("small"),
        cli_cache,
        adapter,
        "serve.max_batch_size=1",
        "serve.queue_size=1",
        "serve.max_wait_ms=0",
        "serve.max_tokens=256",
        "serve.retry_after_s=7",
        env={"MENTALGLM_API_KEY": "test-key-0123456789"},
    )
    yield srv
    srv.stop()


AUTH = {"Authorization": "Bearer test-key-0123456789"}


def test_the_api_key_is_required_when_set(small):
    body = {"model": "mentalglm", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(small.url + "/v1/completions", json=body).status_code == 401
    assert (
        httpx.post(small.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )
    assert httpx.post(small.url + "/v1/completions", json=body, headers=AUTH, timeout=60).status_code == 200
    assert httpx.get(small.url + "/health").status_code == 200  # probes need no key
    assert "test-key-0123456789" not in small.log.read_text()


def test_a_full_queue_answers_503_with_retry_after(small):
    body = {"model": "mentalglm", "prompt": "a long answer please", "max_tokens": 256}

    def send(_):
        return httpx.post(small.url + "/v1/completions", json=body, headers=AUTH, timeout=300)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(send, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "7" and "busy" in busy.json()["error"]["message"]


def test_a_server_beyond_loopback_needs_a_key(run_cli, adapter):
    env = {k: v for k, v in os.environ.items() if k != "MENTALGLM_API_KEY"}
    proc = run_cli("serve.py", *MODEL, f"adapter={adapter}", "serve.host=0.0.0.0", check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "MENTALGLM_API_KEY" in proc.stderr.strip().splitlines()[-1]


def test_shutdown_finishes_the_requests_in_flight(tmp_path, cli_cache, adapter):
    srv = Server(tmp_path, cli_cache, adapter, "serve.max_tokens=256")
    result = {}

    def long_request():
        result["r"] = httpx.post(
            srv.url + "/v1/completions",
            timeout=300,
            json={"model": "mentalglm", "prompt": "tell me more", "max_tokens": 256},
        )

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)
    srv.proc.send_signal(signal.SIGTERM)
    t.join(300)
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"]
    # uvicorn re-raises the signal once it has shut down cleanly.
    assert srv.proc.wait(120) in (0, -signal.SIGTERM)
    assert "Finished server process" in srv.log.read_text()


def test_serve_adapters_that_cannot_share_the_base_stop_in_one_line(run_cli, adapter, tmp_path):
    """serve.adapters: each entry a directory of an adapter of this base, under a free id; else one line, before
    any model loads."""
    import shutil

    other_base = tmp_path / "other_base"
    shutil.copytree(adapter, other_base)
    model = yaml.safe_load((ROOT / "conf/model/tiny_glm.yaml").read_text())
    card = {"mentalglm_card": 1, "model": model | {"system": "You are another assistant."}}
    (other_base / "mentalglm.json").write_text(json.dumps(card))
    cases = [
        (f"serve.adapters={{second:'{tmp_path / 'missing'}'}}", "not a directory"),
        (f"serve.adapters={{mentalglm:'{adapter}'}}", "already serve.model_name"),
        (f"serve.adapters={{second:'{other_base}'}}", "model.system"),
        ("serve.adapters=[a,b]", "serve.adapters="),
    ]
    for override, message in cases:
        proc = run_cli("serve.py", *MODEL, f"adapter={adapter}", override, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (override, proc.stderr[-2000:])
        assert message in proc.stderr.strip().splitlines()[-1], (override, proc.stderr[-500:])
    proc = run_cli("serve.py", *MODEL, f"serve.adapters={{second:'{adapter}'}}", check=False)
    assert proc.returncode == 2 and "adapter= or run_dir=" in proc.stderr.strip().splitlines()[-1]
