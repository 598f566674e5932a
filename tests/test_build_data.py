"""build_data.py against real OpenAI-compatible servers on 127.0.0.1 (no mocked client): the scripted teacher of
tests/teacher_server.py (happy path, injected faults, SIGKILL and resume, revision, translation, baselines) and
the project's own serve.py on the tiny model."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, cli_env
from serving import TeacherServer

from mentalglm.data.loaders import load_records
from mentalglm.data.splits import build_splits
from mentalglm.tasks import TASKS

C_IMHI = "data.select=[sos_hl_1k,socialcd_3k,cp]"
FAULT_BUCKETS = {"429": 0, "500": 1, "timeout": 2, "malformed response": 3, "empty answer": 4}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    srv = TeacherServer(tmp_path_factory.mktemp("teacher"))
    yield srv
    srv.stop()


def build(run_cli, tmp_path, url: str, *overrides: str, check: bool = True, cache: str = "cache", env=None):
    return run_cli(
        "build_data.py",
        "data=fixtures",
        "expert_examples=fixtures",
        f"teacher.base_url={url}",
        "teacher.model=teacher",
        f"cache={tmp_path / cache / 'responses.jsonl'}",
        "teacher.backoff_s=0.05",
        *overrides,
        check=check,
        env=env,
    )


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "outputs/build_data/default/runs").iterdir())


def last_run(tmp_path: Path) -> Path:
    return run_dirs(tmp_path)[-1]


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[-1]


def posts_of(*splits: str) -> list[str]:
    """Every fixture post of the C-IMHI tasks (to check that none reaches a log)."""
    from mentalglm.data.splits import post_of

    cfg = {
        "sos_hl_1k": {
            "train": str(ROOT / "mentalglm/fixtures/sos_hl_1k/suicide_train_LLM.csv"),
        }
    }
    return [post_of(r) for r in build_splits(cfg, seed=42)["train"]]


# ----------------------------------------------------------------------------- the happy path
def test_explain_writes_instruction_data_that_trains_as_it_is(run_cli, tmp_path, teacher):
    start = len(teacher.requests())
    proc = build(run_cli, tmp_path, teacher.url, C_IMHI)
    out = last_run(tmp_path)
    report = json.loads((out / "build_report.json").read_text())
    n = sum(v["items"] for v in report["tasks"].values())
    assert all(v["agreed_rate"] == 1.0 for v in report["tasks"].values())
    assert report["requests"] == {"asked": n, "cached": 0, "failed": {}}
    assert len(teacher.requests()) - start == n  # counted at the server
    assert report["usage"]["prompt_tokens"] == 100 * n and report["usage"]["completion_tokens"] == 20 * n
    assert report["examples"]["sos_hl_1k"]["count"] == 4 and min(report["examples"]["cp"]["per_label"].values()) >= 1
    assert not (out / "revision.csv").exists()
    # data.tasks.<name> reads the files as they are: labels equal the gold labels, answers carry explanations
    splits = build_splits(
        {t: {"train": str(out / "train.jsonl"), "val": str(out / "val.jsonl")} for t in ("sos_hl_1k", "cp")}, seed=0
    )
    assert len(splits["train"]) == report["tasks"]["sos_hl_1k/train"]["items"] + report["tasks"]["cp/train"]["items"]
    row = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert set(row["provenance"]) == {"teacher_model", "prompt_sha256", "date", "revised"}
    assert row["provenance"]["teacher_model"] == "teacher" and row["provenance"]["revised"] is False
    task = TASKS[row["task"]]
    assert row["output"].startswith(task.label_sentence(row["labels"]) + task.explanation_marker)
    # counts and rates in the log, never a post
    logged = proc.stdout + proc.stderr + (out / "build_data.log").read_text()
    assert "agreed 1.0" in logged
    assert not any(post in logged for post in posts_of("train"))


def test_a_second_run_sends_nothing_and_writes_the_same_bytes(run_cli, tmp_path, teacher):
    build(run_cli, tmp_path, teacher.url, "data.select=[sos_hl_1k]")
    first = last_run(tmp_path)
    before = len(teacher.requests())
    build(run_cli, tmp_path, teacher.url, "data.select=[sos_hl_1k]")
    second = last_run(tmp_path)
    assert len(teacher.requests()) == before
    assert json.loads((second / "build_report.json").read_text())["requests"]["cached"] == 110
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_a_changed_prompt_asks_again_only_for_its_task(run_cli, tmp_path, teacher):
    build(run_cli, tmp_path, teacher.url, "data.select=[sos_hl_1k,cp]", "splits=[test]")
    other = tmp_path / "instruction.md"
    other.write_text("另一条指令：请解释风险等级。", encoding="utf-8")
    before = len(teacher.requests())
    build(
        run_cli, tmp_path, teacher.url, "data.select=[sos_hl_1k,cp]", "splits=[test]", f"instructions.sos_hl_1k={other}"
    )
    report = json.loads((last_run(tmp_path) / "build_report.json").read_text())
    assert len(teacher.requests()) - before == report["tasks"]["sos_hl_1k/test"]["items"] == report["requests"]["asked"]
    assert report["requests"]["cached"] == report["tasks"]["cp/test"]["items"]
    # another teacher model or decoding setting is another answer too
    before = len(teacher.requests())
    build(run_cli, tmp_path, teacher.url, "data.select=[cp]", "splits=[test]", "teacher.temperature=0.7")
    assert len(teacher.requests()) - before == report["tasks"]["cp/test"]["items"]


# ----------------------------------------------------------------------------- faults
def build_with_faults(run_cli, tmp_path, faults: str, *overrides: str) -> list:
    """build_data.py on SOS-HL-1K against a teacher with `faults`, 16 requests in flight; what the teacher got."""
    srv = TeacherServer(tmp_path, faults)
    try:
        build(run_cli, tmp_path, srv.url, "data.select=[sos_hl_1k]", "teacher.concurrency=16", *overrides)
        return srv.requests()
    finally:
        srv.stop()


def test_faults_are_retried_counted_and_reported(run_cli, tmp_path):
    faults = "429,500,slow,malformed,empty,truncated,disagree,unparsed"
    requests = build_with_faults(run_cli, tmp_path, faults, "teacher.timeout_s=1.5")
    out = last_run(tmp_path)
    report = json.loads((out / "build_report.json").read_text())
    first_times: dict[str, list[float]] = {}
    for sha, t in requests:
        first_times.setdefault(sha, []).append(t)
    buckets = Counter(int(sha, 16) % 11 for sha in first_times)
    expected = {reason: buckets[b] for reason, b in FAULT_BUCKETS.items() if buckets[b]}
    assert report["usage"]["retries"] == expected
    assert len(requests) == len(first_times) + sum(expected.values())
    # Retry-After: 1 is honoured: the retry of a 429 comes a second later
    gaps = [ts[1] - ts[0] for sha, ts in first_times.items() if int(sha, 16) % 11 == 0]
    assert gaps and min(gaps) >= 0.9
    totals = Counter()
    for v in report["tasks"].values():
        totals.update({k: v[k] for k in ("items", "agreed", "disagreed", "unparsed")})
        totals.update(v.get("problems", {}))
    assert totals["items"] == 110 == len(first_times)
    assert totals["truncated at teacher.max_tokens"] == buckets[5]
    assert totals["disagreed"] == buckets[6]
    assert totals["no label found"] == buckets[7]
    assert totals["agreed"] == 110 - buckets[5] - buckets[6] - buckets[7]
    sheet = list(csv.DictReader(io.StringIO((out / "revision.csv").read_bytes().decode(), newline="")))
    assert len(sheet) == buckets[5] + buckets[6] + buckets[7]
    assert {r["status"] for r in sheet} == {"disagreed", "unparsed"} and all(r["revised_answer"] == "" for r in sheet)
    assert sum(len((out / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "val", "test")) == totals["agreed"]


@pytest.mark.parametrize(
    "faults, overrides, message",
    [
        ("auth", [], "refused the key (401)"),
        ("quota", [], "quota exhausted"),
        ("", ["teacher.model=gpt-5-nonexistent"], "model 'gpt-5-nonexistent' not found (404)"),
    ],
)
def test_errors_a_retry_cannot_mend_end_in_one_line(run_cli, tmp_path, faults, overrides, message):
    srv = TeacherServer(tmp_path, faults)
    try:
        proc = build(
            run_cli, tmp_path, srv.url, "data.select=[sos_hl_1k]", "teacher.concurrency=2", *overrides, check=False
        )
        assert message in error_line(proc)
        assert len(srv.requests()) <= 2  # the requests in flight: no retry, nothing sent after the first refusal
    finally:
        srv.stop()
    assert not (last_run(tmp_path) / "train.jsonl").exists()  # nothing half-written


def test_an_unreachable_server_and_a_remote_url(run_cli, tmp_path):
    from serving import free_port

    proc = build(
        run_cli,
        tmp_path,
        f"http://127.0.0.1:{free_port()}/v1",
        "data.select=[sos_hl_1k]",
        "teacher.max_retries=1",
        check=False,
    )
    assert "gave up after 2 attempts (connection)" in error_line(proc)
    proc = build(run_cli, tmp_path, "https://api.example.com/v1", "data.select=[sos_hl_1k]", check=False)
    line = error_line(proc)
    assert "not on this machine" in line and "teacher.allow_remote=true" in line


def test_the_key_comes_from_the_environment_and_is_written_nowhere(run_cli, tmp_path, teacher):
    secret = "sk-test-9f8e7d6c5b4a"
    build(
        run_cli,
        tmp_path,
        teacher.url,
        "data.select=[sos_hl_1k]",
        "splits=[test]",
        "teacher.api_key_env=MY_TEACHER_KEY",
        env={"MY_TEACHER_KEY": secret},
    )
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path


# ----------------------------------------------------------------------------- SIGKILL and resume
def test_sigkill_then_rerun_sends_no_request_twice_and_writes_identical_files(run_cli, tmp_path, cli_cache):
    srv = TeacherServer(tmp_path, delay_s=0.02)
    try:
        overrides = ["data.select=[socialcd_3k,cp]", "teacher.concurrency=2"]
        cache = tmp_path / "killed" / "responses.jsonl"
        cmd = [
            sys.executable,
            str(ROOT / "build_data.py"),
            f"paths.cache_dir={cli_cache}",
            "data=fixtures",
            "expert_examples=fixtures",
            f"teacher.base_url={srv.url}",
            "teacher.model=teacher",
            f"cache={cache}",
            *overrides,
        ]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=cli_env(tmp_path / "outputs"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not cache.exists() or len(cache.read_bytes().split(b"\n")) < 60):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        answered = len(cache.read_bytes().split(b"\n")) - 1  # complete lines (a torn last one is not counted)
        time.sleep(0.5)
        sent_before = len(srv.requests())
        assert 0 < answered < 600 and sent_before - answered <= 3  # at most the requests in flight, and a torn line
        build(run_cli, tmp_path, srv.url, *overrides, cache="killed")
        resumed = last_run(tmp_path)
        report = json.loads((resumed / "build_report.json").read_text())
        items = sum(v["items"] for v in report["tasks"].values())
        # the rerun asks only for what was not answered: nothing already answered is sent again
        assert report["requests"]["cached"] == answered
        assert len(srv.requests()) - sent_before == items - answered == report["requests"]["asked"]
        build(run_cli, tmp_path, srv.url, *overrides, cache="fresh")
        fresh = last_run(tmp_path)
    finally:
        srv.stop()
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (resumed / name).read_bytes() == (fresh / name).read_bytes()


# ----------------------------------------------------------------------------- revision
def test_revision_round_trip_and_bad_sheets(run_cli, tmp_path):
    srv = TeacherServer(tmp_path, "disagree,unparsed")
    try:
        build(run_cli, tmp_path, srv.url, "data.select=[sos_hl_1k,cp]")
    finally:
        srv.stop()
    out = last_run(tmp_path)
    sheet_path = out / "revision.csv"
    rows = list(csv.DictReader(io.StringIO(sheet_path.read_bytes().decode(), newline="")))
    assert rows and {r["task"] for r in rows} <= {"sos_hl_1k", "cp"}
    assert any("\r" in r["teacher_answer"] for r in rows)  # the unparsed answers' bare CR kept inside its row
    before = {s: (out / f"{s}.jsonl").read_bytes() for s in ("train", "val", "test")}

    def write_sheet(path: Path, edited: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(edited)
        path.write_text(buf.getvalue(), encoding="utf-8")

    def gold_answer(r: dict) -> str:
        task = TASKS[r["task"]]
        return task.format_answer(r["gold"].split(task.label_joiner), "专家修订：帖子中的表述支持这些标签。")

    # a revised answer that states another label: an error naming the row, nothing merged
    bad = [dict(r, revised_answer=gold_answer(r)) for r in rows]
    sos = next(i for i, r in enumerate(bad) if r["task"] == "sos_hl_1k")
    wrong = "低自杀风险" if "高" in rows[sos]["gold"] else "高自杀风险"
    bad[sos]["revised_answer"] = TASKS["sos_hl_1k"].format_answer([wrong], "改错了。")
    edited = tmp_path / "bad.csv"
    write_sheet(edited, bad)
    proc = run_cli("build_data.py", "action=merge", f"run_dir={out}", f"sheet={edited}", check=False)
    line = error_line(proc)
    assert f"bad.csv: row {sos + 2}: field 'revised_answer'" in line and "gold labels" in line
    # an edited id
    bad = [dict(r, revised_answer=gold_answer(r)) for r in rows]
    bad[0]["id"] = "no-such-id"
    write_sheet(edited, bad)
    line = error_line(run_cli("build_data.py", "action=merge", f"run_dir={out}", f"sheet={edited}", check=False))
    assert "bad.csv: row 2: field 'id'" in line
    assert {s: (out / f"{s}.jsonl").read_bytes() for s in before} == before  # nothing half-written
    # the experts fill all but one row: merged, and the rest waits
    good = [dict(r, revised_answer=gold_answer(r)) for r in rows]
    good[-1]["revised_answer"] = ""
    write_sheet(sheet_path, good)
    run_cli("build_data.py", "action=merge", f"run_dir={out}")
    merged = [
        json.loads(line) for s in ("train", "val", "test") for line in (out / f"{s}.jsonl").read_text().splitlines()
    ]
    revised = [r for r in merged if r["provenance"]["revised"]]
    assert len(revised) == len(rows) - 1
    assert all(r["output"].endswith("专家修订：帖子中的表述支持这些标签。") for r in revised)
    assert len((out / "pending.jsonl").read_text().splitlines()) == 1
    records = load_records(None, out / "train.jsonl")
    assert all(r["labels"] == TASKS[r["task"]].order_labels(r["labels"]) for r in records)
    # a second round on the same sheet, its last row now filled: the merged rows are skipped and counted
    good[-1]["revised_answer"] = gold_answer(good[-1])
    write_sheet(sheet_path, good)
    proc = run_cli("build_data.py", "action=merge", f"run_dir={out}")
    assert (
        f"merged 1 revised answers into {out} ({len(rows) - 1} merged before and skipped" in proc.stdout + proc.stderr
    )
    assert (out / "pending.jsonl").read_text() == ""
    report = json.loads((out / "build_report.json").read_text())
    assert report["revisions"][-1] == {
        "sheet": str(sheet_path),
        "merged": 1,
        "already_merged": len(rows) - 1,
        "left": 0,
    }
    after = {s: (out / f"{s}.jsonl").read_bytes() for s in before}
    # a third round changes an already-merged answer: an error naming the spreadsheet row, nothing written
    good[0]["revised_answer"] = good[0]["revised_answer"].replace("专家修订", "第二轮修订")
    write_sheet(sheet_path, good)
    line = error_line(run_cli("build_data.py", "action=merge", f"run_dir={out}", check=False))
    assert "revision.csv: row 2: field 'revised_answer'" in line and "merged before with another answer" in line
    assert {s: (out / f"{s}.jsonl").read_bytes() for s in before} == after


@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_on_disagree_drop_and_keep(run_cli, tmp_path, mode):
    srv = TeacherServer(tmp_path, "disagree")
    try:
        build(run_cli, tmp_path, srv.url, "data.select=[sos_hl_1k]", f"on_disagree={mode}")
    finally:
        srv.stop()
    out = last_run(tmp_path)
    report = json.loads((out / "build_report.json").read_text())
    disagreed = sum(v["disagreed"] for v in report["tasks"].values())
    assert disagreed > 0 and not (out / "revision.csv").exists()
    rows = [
        json.loads(line) for s in ("train", "val", "test") for line in (out / f"{s}.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 110 - (disagreed if mode == "drop" else 0)
    assert sum(v.get("dropped" if mode == "drop" else "kept", 0) for v in report["tasks"].values()) == disagreed
    if mode == "keep":
        kept = [r for r in rows if r["provenance"].get("agrees_with_gold") is False]
        assert len(kept) == disagreed


# ----------------------------------------------------------------------------- translation and baselines
def test_translation_keeps_every_label_and_trains_stage_one(run_cli, tmp_path, teacher):
    out = tmp_path / "imhi_zh"
    run_cli(
        "build_data.py",
        "action=translate",
        "data=fixtures",
        "data.select=[dr,sad,multiwd]",
        "splits=[train,val]",
        f"teacher.base_url={teacher.url}",
        "teacher.model=teacher",
        f"cache={tmp_path / 'cache.jsonl'}",
        f"output={out}",
    )
    source = build_splits(
        {t: {"train": str(ROOT / f"mentalglm/fixtures/imhi/{t}/train.csv")} for t in ("dr", "sad", "multiwd")}, seed=0
    )["train"]
    translated = load_records(None, out / "train.jsonl")
    assert len(translated) == len(source)
    assert Counter((r["task"][: -len("_zh")], r["id"], r["aspect"], tuple(r["labels"])) for r in translated) == Counter(
        (r["task"], r["id"], r["aspect"], tuple(r["labels"])) for r in source
    )
    assert all("这是一段译文" in r["query"] and "推理：这是一段译文" in r["answer"] for r in translated)
    # the data config that trains stage one on it
    from conftest import compose_config

    from mentalglm.config import task_entries, to_dict

    cfg = compose_config(
        ["data=imhi_zh", f"data.dirs.imhi_zh={out}", f"+data.tasks.multiwd_zh={{stage: one, train: {out}/train.jsonl}}"]
    )
    entries = {k: to_dict(v) for k, v in task_entries(cfg.data).items()}
    for e in entries.values():
        e.pop("stage"), e.pop("definition")
    splits = build_splits(entries, seed=0)
    assert {r["task"] for r in splits["train"]} == {"dr_zh", "sad_zh", "multiwd_zh"}


@pytest.mark.parametrize("shots", [0, 2])
def test_api_baseline_is_scored_in_the_results_table(run_cli, tmp_path, teacher, shots):
    run_cli(
        "build_data.py",
        "action=baseline",
        "data=fixtures",
        "data.select=[sos_hl_1k,cp]",
        f"shots={shots}",
        f"teacher.base_url={teacher.url}",
        "teacher.model=teacher",
        f"cache={tmp_path / 'cache.jsonl'}",
    )
    out = last_run(tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"sos_hl_1k", "cp_parent", "cp_child"} <= set(metrics)
    # the scripted teacher answers the first label of the set the prompt states: every answer parses
    scored = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 30 + 30 and all(r["parsed"] for r in scored)
    results = (out / "results.md").read_text()
    assert "SOS-HL-1K" in results and f"teacher {shots}-shot" in results


# ----------------------------------------------------------------------------- the project's own server as teacher
@pytest.mark.slow
def test_serve_py_on_the_tiny_model_is_a_teacher(run_cli, tmp_path, cli_cache):
    """The whole path against serve.py: the tiny model writes no canonical answers, so every item is counted and
    lands in the revision sheet, none in the data files."""
    from serving import Server, make_adapter

    adapter = make_adapter(cli_cache, tmp_path / "adapter")
    srv = Server(tmp_path, cli_cache, adapter, "serve.max_tokens=16")  # a teacher prompt: past data.max_length
    try:
        build(
            run_cli,
            tmp_path,
            srv.url + "/v1",
            "data.select=[sos_hl_1k]",
            "splits=[test]",
            "teacher.model=mentalglm",
            "teacher.max_tokens=16",
            "teacher.concurrency=8",
        )
    finally:
        srv.stop()
    out = last_run(tmp_path)
    report = json.loads((out / "build_report.json").read_text())["tasks"]["sos_hl_1k/test"]
    assert report["items"] == 30 == report["agreed"] + report["disagreed"] + report["unparsed"]
    sheet = list(csv.DictReader(io.StringIO((out / "revision.csv").read_bytes().decode(), newline="")))
    assert (
        len(sheet) == 30 - report["agreed"] and len((out / "test.jsonl").read_text().splitlines()) == report["agreed"]
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["action=distill"], "action='distill' is unknown"),
        (["on_disagree=ignore"], "on_disagree='ignore'"),
        (["splits=[train,dev]"], "['dev'] are not splits"),
        (
            ["instructions.sos_hl_1k=/nonexistent/instruction.md"],
            "instructions.sos_hl_1k=/nonexistent/instruction.md: not a file",
        ),
        (["action=merge"], "action=merge needs run_dir=PATH"),
        (["action=translate", "data.select=[sos_hl_1k]"], "translate.sos_hl_1k: no Chinese task"),
        (["action=baseline", "shots=500"], "shots=500 but task sos_hl_1k has"),
    ],
)
def test_bad_settings_are_one_line_before_any_request(run_cli, tmp_path, teacher, overrides, message):
    before = len(teacher.requests())
    proc = build(run_cli, tmp_path, teacher.url, "data.select=[sos_hl_1k]", *overrides, check=False)
    assert message in error_line(proc)
    assert len(teacher.requests()) == before


# ----------------------------------------------------------------------------- a teacher that misbehaves
def test_a_drip_fed_body_times_out_and_japanese_is_not_chinese(run_cli, tmp_path):
    """teacher.timeout_s bounds the whole request (a body dripped one byte per 0.25 s is cut at 1 s and retried,
    not read for 14 s); an explanation in Japanese is unparsed with that reason, not agreed Chinese data."""
    requests = build_with_faults(run_cli, tmp_path, "drip,japanese", "teacher.timeout_s=1")
    report = json.loads((last_run(tmp_path) / "build_report.json").read_text())
    prompts = {sha for sha, _ in requests}
    dripped = sum(int(sha, 16) % 11 == 9 for sha in prompts)
    japanese = sum(int(sha, 16) % 11 == 8 for sha in prompts)
    assert dripped and japanese
    assert report["usage"]["retries"] == {"timeout": dripped}
    problems = Counter()
    for v in report["tasks"].values():
        problems.update(v.get("problems", {}))
    assert all(p.startswith("explanation not in zh: Japanese kana") for p in problems)
    assert sum(problems.values()) == japanese
    sheet = (last_run(tmp_path) / "revision.csv").read_bytes().decode()
    assert sheet.count("Japanese kana") == japanese


def test_a_teacher_error_quoting_the_post_is_logged_without_it(run_cli, tmp_path):
    srv = TeacherServer(tmp_path, "quote400")
    try:
        proc = build(run_cli, tmp_path, srv.url, "data.select=[sos_hl_1k]", "splits=[test]", check=False)
    finally:
        srv.stop()
    line = error_line(proc)
    assert "rejected the request (400)" in line and "withheld" in line and "sha256" in line
    logged = proc.stdout + proc.stderr + "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.log"))
    assert not any(post[:20] in logged for post in posts_of("test"))


def test_the_cache_survives_corruption_and_is_locked_against_a_second_run(run_cli, tmp_path, teacher):
    from mentalglm.teacher.cache import ResponseCache

    build(run_cli, tmp_path, teacher.url, "data.select=[sos_hl_1k]", "splits=[test]")
    cache = tmp_path / "cache" / "responses.jsonl"
    lines = cache.read_bytes().split(b"\n")[:-1]
    lines[3] = lines[3][: len(lines[3]) // 2]  # a corrupt middle line
    lines.insert(5, b'{"key": "\xff\xfe not utf-8"}')  # a bad byte
    lines.insert(7, b'{"another": "shape"}')  # a line of another JSON shape
    cache.write_bytes(b"\n".join(lines) + b"\n")
    before = len(teacher.requests())
    proc = build(run_cli, tmp_path, teacher.url, "data.select=[sos_hl_1k]", "splits=[test]")
    assert len(teacher.requests()) - before == 1  # only the answer whose line was corrupt is asked again
    assert "3 unreadable lines skipped" in proc.stdout + proc.stderr
    report = json.loads((last_run(tmp_path) / "build_report.json").read_text())
    assert report["requests"]["asked"] == 1 and report["requests"]["cached"] == len(lines) - 3

    held = ResponseCache(cache)  # this process holds the cache, as a run still going would
    assert held.entries
    proc = build(run_cli, tmp_path, teacher.url, "data.select=[sos_hl_1k]", "splits=[test]", check=False)
    assert "is in use by another run" in error_line(proc)
