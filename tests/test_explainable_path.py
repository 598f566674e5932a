"""The explainable model is the default path: stage two trains explanation-bearing C-IMHI (data=c_imhi), a
label-only run happens only on purpose and says so, and a run directory (or its adapter) carries its run to
evaluate, predict, export and train_classifier; the final test and evaluate.py give one number per model."""

import json
from pathlib import Path

import httpx
import pytest
from conftest import FAST_DEMO, ROOT, compose_config

from mentalglm.data.answers import check_explained, explained_counts, has_explanation
from mentalglm.errors import ConfigError
from mentalglm.scoring.score import score
from mentalglm.tasks import TASKS

FIXTURES = ROOT / "mentalglm" / "fixtures"
QUICK = ["model=tiny_glm", "trainer=cpu", "variant=s2", "stages.two.max_epochs=1", "data.limit_eval=2"]
QUICK += ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "generation.max_new_tokens=8"]


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[-1]


# ----------------------------------------------------------------------------- data configs (no model)
def test_stage_two_defaults_to_c_imhi_and_label_only_is_named():
    cfg = compose_config(["stage=two"])
    assert cfg.data.name == "c_imhi" and cfg.data.answers == "explained"
    assert cfg.data.tasks.sos_hl_1k.train.endswith("c_imhi/train.jsonl") and cfg.data.tasks.sos_hl_1k.val_size is None
    for overrides in (["variant=s2"], ["variant=full"]):
        assert compose_config(overrides).data.name == "c_imhi"
    label_only = compose_config(["data=label_only"]).data
    assert label_only.answers == "label_only" and label_only.tasks.sos_hl_1k.train.endswith("suicide_train_LLM.csv")
    demo = compose_config(["experiment=demo"]).data
    assert demo.name == "fixtures" and demo.answers == "explained"


def test_the_c_imhi_fixtures_are_canonical_teacher_answers():
    from mentalglm.data.loaders import load_records

    rows = load_records(None, FIXTURES / "c_imhi" / "train.jsonl")
    assert {r["task"] for r in rows} == {"sos_hl_1k", "socialcd_3k", "cp"}
    for r in rows:
        task = TASKS[r["task"]]
        sentence, marker, why = r["answer"].partition(task.explanation_marker)
        assert task.format_answer(r["labels"]) == sentence and marker and "“" in why  # quotes its evidence
    assert all(n == k for n, k in explained_counts(rows, TASKS).values())


def test_label_only_answers_under_explained_are_an_error_naming_both_ways():
    sos = TASKS["sos_hl_1k"]
    rows = [{"task": "sos_hl_1k", "answer": sos.format_answer(["低自杀风险"])}] * 3
    assert not has_explanation(sos, rows[0]["answer"])
    with pytest.raises(ConfigError, match="build_data.py .*data=c_imhi.*data=label_only"):
        check_explained("c_imhi", "explained", explained_counts(rows, TASKS))
    assert check_explained("label_only", "label_only", explained_counts(rows, TASKS)) == []
    mixed = rows + [{"task": "sos_hl_1k", "answer": sos.format_answer(["低自杀风险"], "帖子只说累。")}]
    assert check_explained("c_imhi", "explained", explained_counts(mixed, TASKS)) == ["sos_hl_1k"]


def test_an_answer_cut_before_its_label_sentence_ends_is_not_parsed():
    cp = TASKS["cp"]
    full = cp.format_answer(["触发性事件-生活", "认知歪曲-以偏概全"], "帖子提到房租。")
    cut_in_label = full[: full.index("、") + 3]  # stops inside the label list: a prefix that parses
    cut_in_why = full[:-3]
    rows = [
        {"task": "cp", "output": cut_in_label, "gold_labels": ["触发性事件-生活"], "truncated": True},
        {"task": "cp", "output": cut_in_why, "gold_labels": ["触发性事件-生活"], "truncated": True},
        {"task": "cp", "output": cut_in_label, "gold_labels": ["触发性事件-生活"]},
    ]
    scored, metrics = score(rows, {"cp": cp})
    assert [r["parsed"] for r in scored] == [False, True, True]
    assert metrics["cp_parent"]["truncated"] == 2 and metrics["cp_child"]["truncated"] == 2


# ----------------------------------------------------------------------------- end to end (tiny model)
@pytest.mark.slow
def test_c_imhi_without_a_build_or_with_label_only_answers_stops_in_one_line(run_cli, tmp_path):
    line = error_line(run_cli("train.py", *QUICK, "data=c_imhi", f"data.dirs.c_imhi={tmp_path / 'none'}", check=False))
    assert "no explanation-bearing data" in line and "python build_data.py" in line and "data=label_only" in line
    build = tmp_path / "label_only_build"
    build.mkdir()
    sos = TASKS["sos_hl_1k"]
    for split in ("train", "val", "test"):
        rows = [
            {
                "task": t,
                "id": str(i),
                "instruction": TASKS[t].format_query(f"帖子{i}，好累")[0],
                "input": "",
                "output": TASKS[t].format_answer([lab]),
            }
            for i in range(4)
            for t, lab in (("sos_hl_1k", sos.labels[i % 2]), ("socialcd_3k", "放大"), ("cp", "驳斥"))
        ]
        (build / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    line = error_line(run_cli("train.py", *QUICK, "data=c_imhi", f"data.dirs.c_imhi={build}", check=False))
    assert "training answers carry no explanation for sos_hl_1k, socialcd_3k, cp" in line
    # on purpose: it trains, and says so
    run_cli("train.py", *QUICK, "data=fixtures_label_only")
    (run,) = [
        d for d in (tmp_path / "outputs" / "train" / "default" / "runs").iterdir() if (d / "summary.json").exists()
    ]
    assert json.loads((run / "summary.json").read_text())["answers"] == "label_only"
    assert "LABEL-ONLY" in (run / "test" / "results.md").read_text().splitlines()[0]


@pytest.mark.slow
def test_a_run_directory_carries_its_run(run_cli, tmp_path, cli_cache):
    run_cli("train.py", *FAST_DEMO)
    run = next((tmp_path / "outputs" / "train" / "demo" / "runs").iterdir())
    adapter = run / "stage_two" / "best_adapter"
    card = json.loads((adapter / "mentalglm.json").read_text())
    assert card["model"]["name"] == "tiny_glm" and card["data"]["name"] == "fixtures" and card["stage"] == "two"
    readme = (adapter / "README.md").read_text()
    assert "Research use" in readme and "tiny_glm" in readme and "## Test F1" in readme and "sos_hl_1k" in readme
    assert (adapter / "tokenizer.json").is_file()
    trained = json.loads((run / "test" / "metrics.json").read_text())

    # evaluate: no model=, no data=; the same adapter, split and settings give the same numbers
    run_cli("evaluate.py", f"run_dir={run}", "trainer.enable_progress_bar=false")
    evaluated_dir = next((tmp_path / "outputs" / "evaluate" / "default" / "runs").iterdir())
    evaluated = json.loads((evaluated_dir / "metrics.json").read_text())
    for key in ("sos_hl_1k", "socialcd_3k", "cp_parent", "cp_child"):  # the same numbers, counts included
        assert evaluated[key] == trained[key], key
    assert trained["fallback"]["sos_hl_1k"]["consistency_n"] >= 0  # the run judged its own explanations
    assert [json.loads(x)["output"] for x in (evaluated_dir / "predictions.jsonl").read_text().splitlines()] == [
        json.loads(x)["output"] for x in (run / "test" / "predictions.jsonl").read_text().splitlines()
    ]

    # predict from the run directory, and from the adapter alone
    for source in (f"run_dir={run}", f"adapter={adapter}"):
        out = tmp_path / f"{source.split('=')[0]}.jsonl"
        run_cli("predict.py", source, "task=sos_hl_1k", "text='最近压力好大，真的想死'", f"output={out}")
        row = json.loads(out.read_text().splitlines()[0])
        assert row["task"] == "sos_hl_1k" and set(row) >= {"labels", "explanation", "output"}

    # a contradicting override is an error naming both values; force=true makes it meant
    line = error_line(run_cli("predict.py", f"run_dir={run}", "model=glm4", "task=cp", "text=x", check=False))
    assert "'glm4'" in line and "model.name='tiny_glm'" in line and "force=true" in line
    line = error_line(run_cli("predict.py", f"run_dir={run}", "model.chat=false", "task=cp", "text=x", check=False))
    assert "model.chat" in line and "True" in line
    run_cli("predict.py", f"run_dir={run}", "model.chat=false", "force=true", "task=cp", "text='帖子'", f"output={out}")

    # serve: the run's model, tasks and templates behind the API
    from serving import ServerProcess

    server = ServerProcess(
        "serve.py", lambda port: [f"paths.cache_dir={cli_cache}", f"run_dir={run}", f"serve.port={port}"], tmp_path
    )
    try:
        answer = httpx.post(
            server.url + "/v1/classify", json={"task": "cp", "text": "房租又涨了。"}, timeout=120
        ).json()
        assert answer["task"] == "cp" and {"labels", "explanation", "output"} <= set(answer)
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["mentalglm"]
    finally:
        server.stop()

    # export and train_classifier: the run's model and data
    merged = tmp_path / "merged"
    run_cli("export.py", f"run_dir={run}", f"output={merged}")
    assert (merged / "config.json").is_file()
    run_cli("train_classifier.py", f"run_dir={run}", "data.select=[sos_hl_1k]")
    clf = next((tmp_path / "outputs" / "train_classifier" / "default" / "runs").iterdir())
    assert "sos_hl_1k" in json.loads((clf / "metrics.json").read_text())["test"]
    # expert_eval: the run's test answers, sampled from the run's test split
    run_cli("expert_eval.py", f"run_dir={run}", "size=4")
    kit = next((tmp_path / "outputs" / "expert_eval" / "default" / "runs").iterdir())
    manifest = json.loads((kit / "sample.json").read_text())
    assert manifest["models"] == {"tiny_glm": str(run / "test" / "predictions.jsonl")} and (kit / "key.csv").is_file()


def test_the_run_card_restores_and_checks(tmp_path):
    from mentalglm.runtime.run_card import restore_run, run_card, write_card

    trained = compose_config(["experiment=demo"])
    card_dir = tmp_path / "adapter"
    card_dir.mkdir()
    write_card(card_dir, run_card(trained, stage="two"))
    cfg = compose_config(["data.max_length=77"], config_name="predict.yaml")
    restore_run(cfg, str(card_dir), overrides=[("data.max_length", False)])
    assert cfg.model.name == "tiny_glm" and cfg.data.name == "fixtures" and cfg.data.max_length == 77
    assert cfg.generation.max_new_tokens == trained.generation.max_new_tokens
    other = compose_config(["data=clinical"], config_name="evaluate.yaml")
    restore_run(other, str(card_dir), overrides=[("data", True)])
    assert other.data.name == "clinical" and other.model.name == "tiny_glm"
    bad = compose_config(["+data.templates.cp={query_template: 'x{post}'}"], config_name="evaluate.yaml")
    with pytest.raises(ConfigError, match="data.templates"):
        restore_run(bad, str(card_dir), overrides=[("data.templates.cp", False)])
    assert Path(card_dir / "mentalglm.json").is_file()


def test_serve_defaults_fit_build_datas_teacher():
    """serve.py as the teacher with both defaults: the teacher's token cap is allowed, and a teacher prompt (a CP
    prompt with definitions and expert examples measured 2,602 tokens) is held to serve.max_prompt_tokens, not
    to the training prompts' data.max_length."""
    from mentalglm.config import ServeSettings, TeacherConfig

    teacher, serve = TeacherConfig(), ServeSettings()
    assert serve.max_tokens >= teacher.max_tokens and serve.max_prompt_tokens >= 2602 + teacher.max_tokens
