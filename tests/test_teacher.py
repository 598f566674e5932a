"""The teacher's parts on their own: expert-example choice, the paper's prompt, the judge of a teacher answer,
rate limits, Retry-After, the destination and key checks; MentaLLaMA's real expert examples behind real_data."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
from conftest import ROOT

from mentalglm.commands.build_data import judge
from mentalglm.config import TeacherConfig
from mentalglm.data.paths import shared_data_dir
from mentalglm.errors import ConfigError
from mentalglm.tasks import TASKS
from mentalglm.teacher import prompts as P
from mentalglm.teacher.client import RateLimiter, TeacherError, api_key, check_destination, retry_after

EXAMPLES = ROOT / "mentalglm/fixtures/expert_examples"
D = shared_data_dir()


def test_examples_cover_every_label_parent_and_child():
    cp = TASKS["cp"]
    examples = P.read_examples(cp, str(EXAMPLES / "cp.jsonl"))
    chosen, coverage = P.choose_examples(cp, examples, None)
    assert chosen == examples and set(coverage) == {*cp.parents, *cp.children} and min(coverage.values()) >= 1
    sos = TASKS["sos_hl_1k"]
    chosen, coverage = P.choose_examples(sos, P.read_examples(sos, str(EXAMPLES / "sos_hl_1k.jsonl")), 1)
    assert len(chosen) == 2 and coverage == {"低自杀风险": 1, "高自杀风险": 1}
    scd = TASKS["socialcd_3k"]
    _, coverage = P.choose_examples(scd, P.read_examples(scd, str(EXAMPLES / "socialcd_3k.jsonl")), 2)
    assert set(coverage.values()) == {2}  # the paper: at least 2 per distortion


def test_examples_without_an_explanation_are_refused(tmp_path):
    sos = TASKS["sos_hl_1k"]
    path = tmp_path / "ex.jsonl"
    row = {
        "id": "a",
        "task": "sos_hl_1k",
        "instruction": sos.format_query("好累")[0],
        "output": "该帖子的发布者有低自杀风险。",
    }
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="item 'a' has no explanation"):
        P.read_examples(sos, str(path))
    with pytest.raises(ConfigError, match="no instruction for task sos_hl_1k"):
        P.read_instruction(sos, None)


def test_the_prompt_holds_instruction_definitions_examples_post_and_gold_labels():
    from conftest import compose_config

    cfg = compose_config(["data=fixtures"], config_name="build_data.yaml")
    sos = TASKS["sos_hl_1k"]
    examples = P.read_examples(sos, str(EXAMPLES / "sos_hl_1k.jsonl"))
    query, start, end = sos.format_query("今天好想去死")
    record = {"query": query, "labels": ["高自杀风险"], "post_start": start, "post_end": end}
    [message] = P.explain_messages(
        sos, record, instruction="指令X", examples=examples, prompts=cfg.prompts.zh, system=None
    )
    text = message["content"]
    assert text.startswith("指令X") and sos.description.splitlines()[0] in text
    assert all(P.raw_post(e) in text for e in examples) and "示例4" in text
    assert '帖子："今天好想去死"' in text and "标签：高自杀风险" in text
    assert "先原样写出“该帖子的发布者有高自杀风险。”，接着写“推理：”" in text


@pytest.mark.parametrize(
    "content, finish, expected",
    [
        ("该帖子的发布者有高自杀风险。推理：帖子中有明确的轻生表达。", "stop", ("agreed", None)),
        ("该帖子的发布者有低自杀风险。推理：帖子中没有轻生表达。", "stop", ("disagreed", None)),
        ("很难判断。", "stop", ("unparsed", "no label found")),
        ("该帖子的发布者有高自杀风险。推理：帖子中", "length", ("unparsed", "truncated at teacher.max_tokens")),
        ("该帖子的发布者有高自杀风险。", "stop", ("unparsed", "no explanation after '推理：'")),
        (
            "该帖子的发布者有高自杀风险。推理：The post states a plan.",
            "stop",
            ("unparsed", "explanation not in zh: too few Chinese characters"),
        ),
        (
            "该帖子的发布者有高自杀风险。推理：投稿の表現はこの判断を支持しています。",
            "stop",
            ("unparsed", "explanation not in zh: Japanese kana (56% of the letters)"),
        ),
    ],
)
def test_the_judge_of_a_teacher_answer(content, finish, expected):
    assert judge(TASKS["sos_hl_1k"], ["高自杀风险"], {"content": content, "finish_reason": finish}) == expected


def test_language_check():
    assert P.has_language("帖子表达了明确的轻生念头。", "zh") and not P.has_language("The poster is sad.", "zh")
    assert P.has_language("The poster is sad.", "en") and not P.has_language("", "en")
    # another language in a script near the expected one is not it
    assert "Japanese kana" in P.language_problem("とても疲れているようです。", "zh")
    assert "Korean hangul" in P.language_problem("게시물은 매우 피곤해 보입니다。", "zh")
    assert P.language_problem("Пост говорит о плане.", "en") == "mostly other"
    assert P.language_problem("帖子说他很累。", "en") == "mostly Chinese characters"
    assert P.has_language("帖子提到了 PHQ-9 量表和 anxiety 一词。", "zh")  # some Latin in Chinese is still Chinese


def test_rate_limits_hold_requests_and_tokens_to_the_window():
    async def run(limiter, tokens):
        start = time.monotonic()
        for n in tokens:
            await limiter.acquire(n)
        return time.monotonic() - start

    assert asyncio.run(run(RateLimiter(2, None, window_s=0.3), [1, 1])) < 0.2
    assert asyncio.run(run(RateLimiter(2, None, window_s=0.3), [1, 1, 1])) >= 0.28
    assert asyncio.run(run(RateLimiter(None, 100, window_s=0.3), [60, 60])) >= 0.28
    assert asyncio.run(run(RateLimiter(None, 100, window_s=0.3), [40, 60])) < 0.2


def test_retry_after_reads_seconds_and_http_dates():
    def error(value):
        return SimpleNamespace(response=SimpleNamespace(headers={"retry-after": value} if value else {}))

    from email.utils import formatdate

    assert retry_after(error("3")) == 3.0 and retry_after(error(None)) is None
    assert 8 <= retry_after(error(formatdate(time.time() + 10, usegmt=True))) <= 10
    assert retry_after(SimpleNamespace()) is None


def test_posts_leave_the_machine_only_when_allowed(monkeypatch):
    check_destination(TeacherConfig(base_url="http://127.0.0.1:8000/v1"))
    check_destination(TeacherConfig(base_url="http://localhost:9/v1"))
    with pytest.raises(TeacherError, match="allow_remote=true"):
        check_destination(TeacherConfig(base_url="https://api.openai.com/v1"))
    check_destination(TeacherConfig(base_url="https://api.openai.com/v1", allow_remote=True))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(TeacherError, match="OPENAI_API_KEY: the environment variable is not set"):
        api_key(TeacherConfig(base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY", allow_remote=True))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert api_key(TeacherConfig(base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY")) == "sk-x"


@pytest.mark.real_data
@pytest.mark.skipif(D is None, reason="no shared real data (../shared/data)")
def test_mentallama_expert_examples_in_the_teacher_prompt():
    from conftest import compose_config

    cfg = compose_config(["data=fixtures"], config_name="build_data.yaml")
    for name, file in (("dr", "DR"), ("sad", "SAD"), ("dreaddit", "dreaddit")):
        task = TASKS[name]
        examples = P.read_examples(task, str(D / f"imhi/expert_examples/{file}.csv"))
        assert len(examples) == 35
        chosen, coverage = P.choose_examples(task, examples, 2)
        assert 0 < len(chosen) <= 2 * len(task.labels)
        assert all(n >= 1 for lab, n in coverage.items() if any(lab in e["labels"] for e in examples))
        [message] = P.explain_messages(
            task, examples[0], instruction="Explain.", examples=chosen, prompts=cfg.prompts.en, system=None
        )
        assert f'first write "{task.label_sentence(examples[0]["labels"])}" exactly' in message["content"]
