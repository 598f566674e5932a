"""The vLLM backend on this CPU (fp32, eager): serve.py starts vLLM with the adapter; chat completions through the
openai client equal the hf backend's answers; evaluate.py and the final test of train.py with
generation.backend=vllm give the hf backend's predictions. Two vLLM start-ups in all (each ~1 minute here)."""

import json
from pathlib import Path

import pytest
from conftest import FAST_DEMO
from serving import MODEL, Server, train_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def vllm_missing() -> str | None:
    from mentalglm.config import VLLMConfig
    from mentalglm.errors import ConfigError
    from mentalglm.serving.vllm import vllm_python

    try:
        vllm_python(VLLMConfig())
    except ConfigError as e:
        return str(e)
    return None


pytestmark.append(pytest.mark.skipif(vllm_missing() is not None, reason=f"vLLM: {vllm_missing()}"))
EVAL = [
    "data.limit_eval=4",
    "data.select=[sos_hl_1k,cp]",
    "generation.max_new_tokens=24",
    "trainer.enable_progress_bar=false",
]


def vllm_servers(started_under: Path) -> set[int]:
    """The pids of vLLM API servers started by runs whose outputs are under `started_under` (their environment
    says so: MENTALGLM_OUTPUT, passed on by serve.py and train.py), so another test worker's are not counted."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"vllm.entrypoints.openai.api_server" not in cmdline.read_bytes():
                continue
            environ = (cmdline.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        output = next((e[len(b"MENTALGLM_OUTPUT=") :] for e in environ if e.startswith(b"MENTALGLM_OUTPUT=")), b"")
        if output.decode(errors="replace").startswith(str(started_under)):
            found.add(int(cmdline.parent.name))
    return found


@pytest.fixture(scope="module", autouse=True)
def no_engine_left_behind(tmp_path_factory):
    """Every vLLM server this worker's runs started is gone once they are done (the suite leaves no process)."""
    import time

    yield
    base = tmp_path_factory.getbasetemp()
    deadline = time.monotonic() + 60
    while (left := vllm_servers(base)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"vLLM servers left running: {sorted(left)}"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, cli_cache):
    # Trained, not random: a random tiny model's logits are nearly flat, and fp32 engines then part ways on
    # near-ties after a few tokens (measured: 3 of 8 random-adapter answers of 32 tokens equal).
    return train_adapter(tmp_path_factory.mktemp("adapter"), cli_cache)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, cli_cache, adapter):
    srv = Server(
        tmp_path_factory.mktemp("vllm"),
        cli_cache,
        adapter,
        "serve.backend=vllm",
        "serve.max_tokens=32",
        f"serve.adapters={{copy:'{adapter}'}}",  # a second LoRA module (the same weights: the same answers)
        "serve.base_model_name=plain",
    )
    import signal
    import time
    from urllib.parse import urlparse

    import httpx

    group = vllm_pid(urlparse(httpx.get(srv.url + "/ready").json()["vllm_url"]).port)
    yield srv
    # Stopped with SIGTERM, serve.py leaves no vLLM process behind (uvicorn re-raised the signal into the default
    # handler, which ended serve.py before its with-block could stop the engine).
    assert srv.stop() == -signal.SIGTERM
    deadline = time.monotonic() + 60
    while process_group(group) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert process_group(group) == [], "vLLM processes left after SIGTERM"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_vllm_serves_the_adapter_and_answers_as_the_hf_backend(vllm_server, cli_cache, adapter):
    import httpx
    from conftest import ROOT
    from omegaconf import OmegaConf
    from openai import OpenAI

    from mentalglm.config import DataConfig, GenerationConfig, as_config
    from mentalglm.runtime.generation import generate_batch
    from mentalglm.serving.predictor import Predictor
    from mentalglm.tasks import TASKS

    ready = httpx.get(vllm_server.url + "/ready").json()
    assert ready["backend"] == "vllm"
    served = [m["id"] for m in httpx.get(ready["vllm_url"] + "/models").json()["data"]]
    assert {"mentalglm", "copy", "base"} <= set(served)  # the adapters, and the base beside them
    ours = [m["id"] for m in httpx.get(vllm_server.url + "/v1/models").json()["data"]]
    assert ours == ["mentalglm", "copy", "plain"]

    client = OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", max_retries=0)
    model_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_glm.yaml"))
    hf = Predictor(
        model_cfg,
        {"sos_hl_1k": TASKS["sos_hl_1k"]},
        str(adapter),
        cache_dir=cli_cache,
        data=as_config(DataConfig, {"name": "t"}),
        generation=GenerationConfig(),
    )
    sos = TASKS["sos_hl_1k"]
    for post in ("最近真的想死，谁能懂我", "下班后有点焦虑，累", "I feel like a burden to everyone."):
        messages = [{"role": "user", "content": sos.format_query(post)[0]}]
        answer = client.chat.completions.create(model="mentalglm", messages=messages, max_tokens=32, temperature=0)
        expected = generate_batch(hf.model, hf.tokenizer, [hf.messages_prompt(messages)], max_new_tokens=32)[0]
        assert answer.choices[0].message.content == expected
        stream = client.chat.completions.create(model="mentalglm", messages=messages, max_tokens=32, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        again = client.chat.completions.create(model="copy", messages=messages, max_tokens=32, temperature=0)
        assert again.choices[0].message.content == expected and again.model == "copy"
    plain = client.chat.completions.create(model="plain", messages=messages, max_tokens=8)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.model == "plain"
    seeded = [
        client.chat.completions.create(model="mentalglm", messages=messages, max_tokens=16, temperature=1.0, seed=5)
        for _ in range(2)
    ]
    assert seeded[0].choices[0].message.content == seeded[1].choices[0].message.content
    scored = client.chat.completions.create(
        model="mentalglm", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-5) and content[0].logprob <= 0
    vllm_log = next(vllm_server.outputs.rglob("vllm.log")).read_text(errors="replace")
    assert "谁能懂我" not in vllm_log  # vLLM runs with request logging off


def test_evaluate_with_vllm_equals_the_hf_backend(vllm_server, run_cli, tmp_path, adapter):
    import httpx

    upstream = httpx.get(vllm_server.url + "/ready").json()["vllm_url"]
    hf, vl = tmp_path / "hf", tmp_path / "vllm"
    run_cli("evaluate.py", *MODEL, "trainer=cpu", f"adapter={adapter}", *EVAL, f"output_dir={hf}")
    run_cli(
        "evaluate.py",
        *MODEL,
        "trainer=cpu",
        f"adapter={adapter}",
        *EVAL,
        f"output_dir={vl}",
        "generation.backend=vllm",
        f"generation.vllm.base_url={upstream}",
    )
    a, b = read_jsonl(hf / "predictions.jsonl"), read_jsonl(vl / "predictions.jsonl")
    assert len(a) == len(b) == 8
    assert [(r["id"], r["output"], r["pred_labels"]) for r in a] == [
        (r["id"], r["output"], r["pred_labels"]) for r in b
    ]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (hf, vl))
    assert {k: ma[k]["f1"] for k in ("sos_hl_1k", "cp_parent")} == {k: mb[k]["f1"] for k in ("sos_hl_1k", "cp_parent")}


def test_the_final_test_of_train_runs_on_vllm(run_cli, tmp_path):
    """train.py starts vLLM itself for its final test (with the exported best adapter) once training is done; the
    predictions equal evaluate.py's hf backend on that adapter."""
    run_cli(
        "train.py",
        *FAST_DEMO,
        "variant=s2",
        "stages.two.max_epochs=1",
        "data.limit_eval=4",
        "data.select=[sos_hl_1k]",
        "generation.backend=vllm",
        timeout=900,
    )
    (run,) = sorted((tmp_path / "outputs" / "train").glob("*/runs/*"))
    adapter = json.loads((run / "summary.json").read_text())["best_adapter"]
    out = tmp_path / "hf"
    run_cli(
        "evaluate.py",
        *MODEL,
        "trainer=cpu",
        f"adapter={adapter}",
        "data.limit_eval=4",
        "data.select=[sos_hl_1k]",
        "generation.max_new_tokens=24",
        f"output_dir={out}",
    )
    a, b = read_jsonl(run / "test" / "predictions.jsonl"), read_jsonl(out / "predictions.jsonl")
    assert [(r["id"], r["output"]) for r in a] == [(r["id"], r["output"]) for r in b] and len(a) == 4
    assert (run / "test" / "vllm.log").is_file()


def process_group(pgid: int) -> list[int]:
    """The live processes of a process group (vLLM runs in a session of its own, its engine beside it)."""
    from pathlib import Path

    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def vllm_pid(port: int) -> int:
    from pathlib import Path

    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in args and str(port).encode() in args:
            return int(cmdline.parent.name)
    raise AssertionError(f"no vLLM server on port {port}")


def test_no_vllm_engine_outlives_a_killed_serve(tmp_path, cli_cache, adapter):
    """Killed (SIGKILL, no clean-up possible), serve.py leaves no vLLM process behind: the engine gets SIGTERM when
    its parent dies. (SIGTERM: the vllm_server fixture's teardown.)"""
    import signal
    import time
    from urllib.parse import urlparse

    import httpx

    srv = Server(tmp_path, cli_cache, adapter, "serve.backend=vllm", "serve.max_tokens=32")
    group = vllm_pid(urlparse(httpx.get(srv.url + "/ready").json()["vllm_url"]).port)
    assert process_group(group)
    srv.stop(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while process_group(group) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert process_group(group) == [], "vLLM processes left after SIGKILL"
