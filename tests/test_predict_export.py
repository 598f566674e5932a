"""predict.py (one post, JSONL and CSV files, resume after SIGKILL, bad input) and export.py (merged checkpoint
equal to the adapter) as real processes on the tiny GLM."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, cli_env
from serving import MODEL, make_adapter

pytestmark = pytest.mark.slow
POSTS = [f"帖子{i}：最近压力很大，有时候想死。" if i % 3 else f"Post {i}: I feel alone and tired." for i in range(12)]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, cli_cache):
    return make_adapter(cli_cache, tmp_path_factory.mktemp("adapter") / "adapter", seed=5)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_posts(path, tasks=("sos_hl_1k", "socialcd_3k")):
    path.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "task": tasks[i % len(tasks)], "text": p}, ensure_ascii=False) + "\n"
            for i, p in enumerate(POSTS)
        ),
        encoding="utf-8",
    )
    return path


def test_predict_a_jsonl_and_a_csv_file(run_cli, tmp_path, adapter):
    posts = write_posts(tmp_path / "posts.jsonl")
    out = tmp_path / "out.jsonl"
    proc = run_cli(
        "predict.py", *MODEL, f"adapter={adapter}", f"input={posts}", f"output={out}", "generation.max_new_tokens=16"
    )
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(12)]
    assert {r["task"] for r in rows} == {"sos_hl_1k", "socialcd_3k"}
    assert set(rows[0]) == {
        "id",
        "task",
        "aspect",
        "labels",
        "label_names",
        "parsed",
        "explanation",
        "output",
        "truncated",
    }
    assert "screening aids" in proc.stdout and not any(p in out.read_text(encoding="utf-8") for p in POSTS)

    table = tmp_path / "posts.csv"
    with open(table, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["post", "aspect"])
        w.writerows([[p, "perceived burdensomeness"] for p in POSTS[:3]])
    out2 = tmp_path / "out2.jsonl"
    run_cli(
        "predict.py",
        *MODEL,
        f"adapter={adapter}",
        f"input={table}",
        "text_field=post",
        "task=irf",
        f"output={out2}",
        "generation.max_new_tokens=16",
    )
    assert [(r["id"], r["task"], r["aspect"]) for r in read_jsonl(out2)] == [
        (str(i), "irf", "perceived burdensomeness") for i in (1, 2, 3)
    ]


def test_predict_resumes_after_sigkill_with_the_same_output(tmp_path, cli_cache, adapter):
    posts = write_posts(tmp_path / "posts.jsonl")
    args = [
        sys.executable,
        str(ROOT / "predict.py"),
        f"paths.cache_dir={cli_cache}",
        *MODEL,
        f"adapter={adapter}",
        f"input={posts}",
        "generation.max_new_tokens=128",
        "data.eval_batch_size=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = cli_env(tmp_path / "outputs")
    reference = tmp_path / "reference.jsonl"
    subprocess.run(
        [*args, f"output={reference}", f"hydra.run.dir={tmp_path / 'ref'}"],
        env=env,
        check=True,
        capture_output=True,
        cwd=ROOT,
        timeout=600,
    )
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [*args, f"output={out}"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    partial = tmp_path / "run" / "predictions.partial.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (partial.is_file() and partial.read_text().count("\n") >= 4):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = partial.read_text().count("\n")
    assert 4 <= written < 12 and not out.exists()
    again = subprocess.run(
        [*args, f"output={out}", "resume=true"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming: {written} of 12 posts already predicted" in (tmp_path / "run" / "predict.log").read_text()
    assert out.read_bytes() == reference.read_bytes() and not partial.exists()


@pytest.mark.parametrize(
    "content,args,message",
    [
        ('{"id": 1, "task": "sos_hl_1k"}\n', [], "field 'text'"),
        ('{"text": "好累", "task": "nope"}\n', [], "field 'task'"),
        ('{"text": "好累"}\n', [], "field 'task'"),
        ('{"text": "  ", "task": "sos_hl_1k"}\n', [], "empty"),
        (
            '{"id": "a", "text": "好累", "task": "cp"}\n{"id": "a", "text": "又累", "task": "cp"}\n',
            [],
            "repeats line 1",
        ),
        ("\n\n", [], "empty file"),
        ('{"text": "好累", "task": "sos_hl_1k"}\n', ["text=x"], "one of the two"),
        ('{"text": "I am a burden", "task": "irf"}\n', [], "aspect"),
    ],
)
def test_bad_predict_input_is_one_line(run_cli, tmp_path, adapter, content, args, message):
    posts = tmp_path / "bad.jsonl"
    posts.write_text(content, encoding="utf-8")
    proc = run_cli("predict.py", *MODEL, f"adapter={adapter}", f"input={posts}", *args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_export_merges_the_adapter_into_a_standalone_checkpoint(run_cli, tmp_path, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    proc = run_cli("export.py", *MODEL, f"adapter={adapter}", f"output={out}")
    assert "max |logit difference|" in proc.stdout
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter)).eval()
    ids = AutoTokenizer.from_pretrained(out)("最近总是睡不着", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )
    proc = run_cli("export.py", *MODEL, check=False)
    assert proc.returncode == 2 and "nothing to merge" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("described", [False, True])
def test_predict_prompts_carry_the_description_when_the_adapter_was_trained_with_it(cli_cache, described):
    from omegaconf import OmegaConf

    from mentalglm.serving.predictor import Predictor
    from mentalglm.tasks import TASKS

    model = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_glm.yaml"))
    data = {"name": "t", "task_description": described}
    p = Predictor(
        model, {"sos_hl_1k": TASKS["sos_hl_1k"]}, None, cache_dir=cli_cache, data=data, generation={}, load=False
    )
    ids, truncated = p.post_prompt(TASKS["sos_hl_1k"], "最近好累")
    text = p.tokenizer.decode(ids)
    assert ("低自杀风险：帖子表达了负面情绪" in text) is described and "最近好累" in text and not truncated


def test_interactive_predict_answers_each_line_and_writes_nothing_unless_asked(tmp_path, cli_cache, adapter):
    """predict.py interactive=true: posts piped line by line, each answered (labels, explanation), task switched with
    /task, a bad line answered with an error and the session going on; no file unless output=, and then no post."""
    post = "最近总是失眠，觉得活着很累。"
    lines = [post, "", "/task nope", "/task cp", "I feel like a burden to everyone.", "   ", "/quit", "not read"]

    def session(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "predict.py"), f"paths.cache_dir={cli_cache}", *MODEL, f"adapter={adapter}"]
            + ["interactive=true", "task=sos_hl_1k", "generation.max_new_tokens=16", *extra],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=cli_env(tmp_path / "outputs"),
            timeout=300,
        )

    proc = session()
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("labels: ") == 2 and out.count("explanation: ") == 2 and "not diagnoses" in out
    assert "error: unknown task 'nope'" in out and "task: cp" in out
    assert out.strip().splitlines()[-1] == "2 posts answered; nothing written"
    written = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert not [p for p in written if post in p.read_text(errors="replace")]
    assert not [p for p in written if p.suffix == ".jsonl"]

    saved = tmp_path / "answers.jsonl"
    proc = session(f"output={saved}")
    rows = read_jsonl(saved)
    assert proc.returncode == 0 and len(rows) == 2 and [r["task"] for r in rows] == ["sos_hl_1k", "cp"]
    assert post not in saved.read_text(encoding="utf-8")
