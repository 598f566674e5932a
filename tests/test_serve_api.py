"""serve.py as real clients meet it: the OpenAI sampling parameters, exact counts, client libraries in processes
of their own, and the requests that must not stall or break it (a 10 MB body, clients that leave, a full queue
of streams, malformed keys). Two real server processes on 127.0.0.1 (hf backend, the tiny GLM)."""

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import ROOT, cli_env
from serving import Server, make_adapter

pytestmark = pytest.mark.slow
KEY = "api-key-5f1e0c9a"
AUTH = {"Authorization": f"Bearer {KEY}"}
POST = "最近总是失眠，觉得活着很累。"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, cli_cache):
    return make_adapter(cli_cache, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def second(tmp_path_factory, cli_cache):
    return make_adapter(cli_cache, tmp_path_factory.mktemp("adapter") / "second", seed=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory, cli_cache, adapter, second):
    """Batches of up to 4, answers up to 64 tokens, no key; a second adapter and the base beside the first."""
    srv = Server(
        tmp_path_factory.mktemp("serve"),
        cli_cache,
        adapter,
        "serve.max_tokens=64",
        "serve.max_batch_size=4",
        "serve.max_wait_ms=20",
        f"serve.adapters={{second:'{second}'}}",
        "serve.base_model_name=base",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, cli_cache, adapter):
    """One request generated at a time, two waiting, long answers, a key: where a request that is not cancelled,
    or a stream admitted past a full queue, shows."""
    srv = Server(
        tmp_path_factory.mktemp("narrow"),
        cli_cache,
        adapter,
        "serve.max_batch_size=1",
        "serve.queue_size=2",
        "serve.max_wait_ms=0",
        "serve.max_tokens=1500",
        "serve.retry_after_s=3",
        env={"MENTALGLM_API_KEY": KEY},
    )
    yield srv
    srv.stop()


def post(srv, path: str, body: dict, headers: dict | None = None, timeout: float = 120) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=timeout)


def chat(srv, headers: dict | None = None, **fields) -> dict:
    body = {"model": "mentalglm", "messages": [{"role": "user", "content": POST}], "max_tokens": 24} | fields
    r = post(srv, "/v1/chat/completions", body, headers)
    assert r.status_code == 200, r.text
    return r.json()


def text(response: dict, i: int = 0) -> str:
    return response["choices"][i]["message"]["content"]


# ----------------------------------------------------------------------------- sampling as the API defines it
def test_seeded_sampling_is_reproducible_and_n_gives_each_seed(server):
    greedy = text(chat(server))
    assert text(chat(server, temperature=0)) == greedy
    first, again = chat(server, temperature=1.0, seed=11), chat(server, temperature=1.0, seed=11)
    assert text(first) == text(again)
    others = {text(chat(server, temperature=1.0, seed=s)) for s in range(12, 16)}
    assert len(others | {text(first)}) > 1  # seeds matter
    three = chat(server, temperature=1.0, seed=11, n=3)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert [text(three, i) for i in range(3)] == [text(chat(server, temperature=1.0, seed=11 + i)) for i in range(3)]
    assert three["usage"]["completion_tokens"] == sum(
        chat(server, temperature=1.0, seed=11 + i)["usage"]["completion_tokens"] for i in range(3)
    )
    # top_k=1, or a top_p that keeps one token, samples the greedy answer
    assert text(chat(server, temperature=1.0, top_k=1, seed=3)) == greedy
    assert text(chat(server, temperature=1.5, top_p=1e-6, seed=4)) == greedy
    penalised = chat(server, frequency_penalty=2.0, presence_penalty=2.0, max_tokens=48)
    assert penalised["choices"][0]["finish_reason"] in ("stop", "length")


def test_sampled_answers_do_not_depend_on_their_batch(server):
    alone = text(chat(server, temperature=0.9, seed=21, max_tokens=32))
    with ThreadPoolExecutor(4) as pool:
        together = list(
            pool.map(lambda s: text(chat(server, temperature=0.9, seed=s, max_tokens=32)), [21, 22, 23, 21, 24, 21])
        )
    assert together[0] == together[3] == together[5] == alone


def test_finish_reason_and_usage_count_the_tokens_returned(server):
    for cap in (1, 3, 17, 64):
        r = chat(server, max_tokens=cap)
        n, reason = r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]
        assert n <= cap and reason == ("length" if n == cap else "stop"), (cap, n, reason)
        assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + n
    cut = chat(server, max_tokens=None, max_completion_tokens=3)  # the SDK's current name is honoured
    assert cut["usage"]["completion_tokens"] == 3 and cut["choices"][0]["finish_reason"] == "length"
    long = text(chat(server, max_tokens=64))
    stop_at = long[len(long) // 2 : len(long) // 2 + 2]
    if stop_at.strip():
        stopped = chat(server, max_tokens=64, stop=[stop_at])
        assert stopped["choices"][0]["finish_reason"] == "stop" and stop_at not in text(stopped)


def test_content_parts_stream_usage_and_accepted_defaults(server):
    plain = chat(server)
    parts = [{"type": "text", "text": POST[:5]}, {"type": "text", "text": POST[5:]}]
    as_parts = chat(server, messages=[{"role": "user", "content": parts}])
    assert text(as_parts) == text(plain)
    developer = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": POST}]
    assert chat(server, messages=developer)["choices"]
    defaults = chat(
        server,
        response_format={"type": "text"},
        logprobs=False,
        tool_choice="none",
        user="study-17",
        metadata={"x": 1},
        store=False,
        some_future_field=True,
    )
    assert text(defaults) == text(plain)

    body = {
        "model": "mentalglm",
        "messages": [{"role": "user", "content": POST}],
        "max_tokens": 24,
        "temperature": 0.8,
        "seed": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in events if c["choices"])
    assert streamed == text(chat(server, temperature=0.8, seed=5))
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0


def test_logprobs_of_the_tokens_returned(server, cli_cache, adapter):
    import torch
    from omegaconf import OmegaConf

    from mentalglm.config import DataConfig, GenerationConfig, as_config
    from mentalglm.serving.predictor import Predictor
    from mentalglm.tasks import TASKS

    r = chat(server, logprobs=True, top_logprobs=3)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    for token in content:  # greedy, no penalties: the chosen token is the most likely one
        assert len(token["top_logprobs"]) == 3 and token["logprob"] == token["top_logprobs"][0]["logprob"] <= 0
        assert token["bytes"] == list(token["token"].encode("utf-8", "replace"))
    alone = Predictor(
        OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_glm.yaml")),
        {"sos_hl_1k": TASKS["sos_hl_1k"]},
        str(adapter),
        cache_dir=cli_cache,
        data=as_config(DataConfig, {"name": "t"}),
        generation=GenerationConfig(),
    )
    ids = alone.messages_prompt([{"role": "user", "content": POST}])
    with torch.no_grad():
        first = torch.log_softmax(alone.model(torch.tensor([ids])).logits[0, -1].float(), -1)
    assert abs(first.max().item() - content[0]["logprob"]) < 1e-4  # the model's own distribution

    text_choice = post(
        server, "/v1/completions", {"model": "mentalglm", "prompt": POST, "max_tokens": 8, "logprobs": 2}
    )
    found = text_choice.json()["choices"][0]["logprobs"]
    assert len(found["tokens"]) == len(found["token_logprobs"]) == text_choice.json()["usage"]["completion_tokens"]
    assert all(len(top) <= 2 for top in found["top_logprobs"]) and found["text_offset"][0] == 0
    assert chat(server)["choices"][0]["logprobs"] is None
    sampled = chat(server, logprobs=True, temperature=1.0, seed=2)["choices"][0]["logprobs"]["content"]
    assert all(t["logprob"] <= 0 and t["top_logprobs"] == [] for t in sampled)


@pytest.mark.parametrize(
    "path,fields,message",
    [
        ("/v1/chat/completions", {"logprobs": 2}, "true or false"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "needs logprobs: true"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "stream": True}, "stream=true"),
        ("/v1/completions", {"logprobs": True}, "number of alternatives"),
        ("/v1/completions", {"logprobs": 21}, "0 to 20"),
    ],
)
def test_logprobs_asked_wrongly_get_a_400(server, path, fields, message):
    body = {"model": "mentalglm", "max_tokens": 4} | (
        {"messages": [{"role": "user", "content": POST}]} if "chat" in path else {"prompt": POST}
    )
    r = post(server, path, body | fields)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_classify_is_greedy_unless_asked_to_sample(server):
    body = {"task": "sos_hl_1k", "text": POST, "max_tokens": 32}
    greedy = post(server, "/v1/classify", body).json()
    assert post(server, "/v1/classify", body).json()["output"] == greedy["output"]
    sampled = [post(server, "/v1/classify", body | {"temperature": 1.0, "seed": 9}).json() for _ in range(2)]
    assert sampled[0]["output"] == sampled[1]["output"]
    assert greedy["finish_reason"] in ("stop", "length") and greedy["model"] == "mentalglm"


# ----------------------------------------------------------------------------- several adapters, one base
def test_two_adapters_and_the_base_each_answer_as_alone(server, cli_cache, adapter, second):
    from omegaconf import OmegaConf

    from mentalglm.config import DataConfig, GenerationConfig, as_config
    from mentalglm.runtime.generation import generate_batch
    from mentalglm.serving.predictor import Predictor
    from mentalglm.tasks import TASKS

    assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["mentalglm", "second", "base"]
    messages = [{"role": "user", "content": POST}]
    model_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_glm.yaml"))
    expected = {}
    for name, path in (("mentalglm", adapter), ("second", second), ("base", None)):
        alone = Predictor(
            model_cfg,
            {"sos_hl_1k": TASKS["sos_hl_1k"]},
            None if path is None else str(path),
            cache_dir=cli_cache,
            data=as_config(DataConfig, {"name": "t"}),
            generation=GenerationConfig(),
        )
        expected[name] = generate_batch(
            alone.model, alone.tokenizer, [alone.messages_prompt(messages)], max_new_tokens=24
        )[0]
    assert len(set(expected.values())) == 3  # three models, three answers
    work = ["mentalglm", "second", "base"] * 4
    with ThreadPoolExecutor(6) as pool:  # interleaved: batches hold rows of several adapters
        answers = list(pool.map(lambda m: text(chat(server, model=m)), work))
    assert answers == [expected[m] for m in work]
    classified = post(server, "/v1/classify", {"task": "sos_hl_1k", "text": POST, "model": "second"}).json()
    assert classified["model"] == "second"
    assert post(server, "/v1/classify", {"task": "sos_hl_1k", "text": POST, "model": "other"}).status_code == 404


# ----------------------------------------------------------------------------- client libraries, as users run them
@pytest.mark.parametrize("library", ["openai", "openai_async", "langchain", "litellm"])
def test_client_libraries_chat_stream_and_sample(server, library):
    pytest.importorskip({"openai_async": "openai", "langchain": "langchain_openai"}.get(library, library))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/client_calls.py"), library, server.url + "/v1", "unused"],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(server.outputs),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    greedy = text(chat(server))
    assert out["chat"] == greedy and out["stream"] == greedy
    assert out["sampled"] == out["sampled_again"] == text(chat(server, temperature=0.7, seed=7))


# ----------------------------------------------------------------------------- one request cannot stall the rest
def test_a_10_mb_body_is_refused_while_health_answers(narrow):
    big = b'{"model": "mentalglm", "prompt": "' + b"x" * 10_000_000 + b'"}'
    health: list[float] = []
    finished = threading.Event()

    def probe():
        while not finished.is_set():
            start = time.perf_counter()
            assert httpx.get(narrow.url + "/health", timeout=30).status_code == 200
            health.append(time.perf_counter() - start)
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        start = time.perf_counter()
        r = httpx.post(narrow.url + "/v1/completions", content=big, headers=AUTH, timeout=60)
        refused_after = time.perf_counter() - start
    finally:
        finished.set()
        prober.join()
    assert r.status_code == 413 and "serve.max_body_bytes" in r.json()["error"]["message"]
    assert health and max(health) < max(refused_after, 1.0)  # /health never waited for the big request

    def chunked():  # no Content-Length: refused once the bytes read pass the limit
        yield b'{"model": "mentalglm", "prompt": "'
        for _ in range(40):
            yield b"y" * 100_000
        yield b'"}'

    r = httpx.post(narrow.url + "/v1/completions", content=chunked(), headers=AUTH, timeout=60)
    assert r.status_code == 413


def test_the_key_in_any_case_of_bearer_and_docs_behind_it(narrow):
    body = {"model": "mentalglm", "prompt": "hi", "max_tokens": 2}
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = post(narrow, "/v1/completions", body, {"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200, (scheme, r.text)
    assert post(narrow, "/v1/completions", body, {"Authorization": KEY}).status_code == 401
    assert post(narrow, "/v1/completions", body, {"Authorization": f"Basic {KEY}"}).status_code == 401
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(narrow.url + path).status_code == 401
        assert httpx.get(narrow.url + path, headers=AUTH).status_code == 200
    for path in ("/health", "/ready", "/"):
        assert httpx.get(narrow.url + path).status_code == 200
    assert KEY not in narrow.log.read_text(errors="replace")


def long_body(**fields) -> dict:
    return {"model": "mentalglm", "prompt": "a long answer please", "max_tokens": 1500, "ignore_eos": True} | fields


def timed_short_request(srv) -> float:
    start = time.perf_counter()
    r = post(srv, "/v1/completions", {"model": "mentalglm", "prompt": "hi", "max_tokens": 2}, AUTH)
    assert r.status_code == 200, r.text
    return time.perf_counter() - start


def test_clients_that_leave_free_their_slot_at_once(narrow):
    start = time.perf_counter()
    full = post(narrow, "/v1/completions", long_body(), AUTH, timeout=300).json()
    long_s = time.perf_counter() - start
    assert full["usage"]["completion_tokens"] == 1500 and full["choices"][0]["finish_reason"] == "length"

    # a non-streaming client that times out
    with pytest.raises(httpx.ReadTimeout):
        post(narrow, "/v1/completions", long_body(), AUTH, timeout=long_s / 5)
    assert timed_short_request(narrow) < long_s / 2

    # 20 streaming clients that read one event and go away
    for _ in range(20):
        with httpx.stream("POST", narrow.url + "/v1/completions", json=long_body(stream=True), headers=AUTH) as r:
            assert r.status_code in (200, 503)
            if r.status_code == 200:
                next(r.iter_lines())
    assert timed_short_request(narrow) < long_s / 2
    time.sleep(0.5)
    assert " 499 " in narrow.log.read_text(errors="replace")  # the cancelled request, logged as cancelled


def test_a_full_queue_refuses_streams_with_503_before_they_start(narrow):
    from openai import APIStatusError, OpenAI

    def stream_one(_):
        with httpx.stream(
            "POST", narrow.url + "/v1/completions", json=long_body(stream=True), headers=AUTH, timeout=300
        ) as r:
            lines = [line for line in r.iter_lines() if line] if r.status_code == 200 else []
            return r.status_code, r.headers.get("retry-after"), lines

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(stream_one, range(6)))
    codes = sorted(code for code, _, _ in results)
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    for code, retry, lines in results:
        if code == 503:
            assert retry == "3"
        else:
            assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)

    # the openai client sees a 503 (which it retries), not an error inside a stream
    client = OpenAI(base_url=narrow.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    with ThreadPoolExecutor(6) as pool:
        busy = [pool.submit(post, narrow, "/v1/completions", long_body(), AUTH, 300) for _ in range(4)]
        time.sleep(0.5)
        with pytest.raises(APIStatusError) as refused:
            list(client.completions.create(model="mentalglm", prompt="hi", max_tokens=1500, stream=True))
        assert refused.value.status_code == 503
        [f.result() for f in busy]
