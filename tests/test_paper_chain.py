"""The whole paper as one chain (`make paper`): the fixture teacher, and the chain itself on the tiny model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env
from omegaconf import OmegaConf

from mentalglm.data.loaders import load_records
from mentalglm.fixtures.make_fixtures import fixture_answer
from mentalglm.fixtures.teacher import NO_LABEL, answer
from mentalglm.tasks import TASKS
from mentalglm.teacher import prompts as P

FIXTURES = ROOT / "mentalglm" / "fixtures"
PROMPTS = OmegaConf.load(ROOT / "conf" / "build_data.yaml").prompts.zh


def explain_prompt(record: dict, examples: list[dict] = ()) -> str:
    task = TASKS[record["task"]]
    messages = P.explain_messages(
        task, record, instruction="说明", examples=list(examples), prompts=PROMPTS, system=None
    )
    return messages[-1]["content"]


def test_the_fixture_teacher_writes_the_canonical_answer_and_sometimes_disagrees():
    rows = load_records(None, FIXTURES / "c_imhi" / "train.jsonl")
    examples = {t: [r for r in rows if r["task"] == t][:2] for t in ("sos_hl_1k", "socialcd_3k", "cp")}
    agreed = disagreed = 0
    for record in rows:
        prompt = explain_prompt(record, examples[record["task"]])  # the post comes after the expert examples
        assert answer(prompt, disagree_every=0) == record["answer"]  # exactly what data=fixtures holds
        said = answer(prompt, disagree_every=12)
        task = TASKS[record["task"]]
        if said == record["answer"]:
            agreed += 1
        else:  # another label, the same explanation: build_data sends it to the revision sheet
            disagreed += 1
            assert said.partition(task.explanation_marker)[2] == record["answer"].partition(task.explanation_marker)[2]
            assert said.partition(task.explanation_marker)[0] != task.label_sentence(record["labels"])
        assert answer(prompt, disagree_every=12) == said  # deterministic
    assert agreed > 0.8 * len(rows) and disagreed > 0.04 * len(rows)


def test_the_fixture_teacher_answers_nothing_it_cannot_read():
    record = load_records(None, FIXTURES / "c_imhi" / "train.jsonl")[0]
    foreign = {**record, "query": "一个与样例无关的帖子", "post_start": None}
    assert answer(explain_prompt(foreign), 0) == NO_LABEL  # not a fixture post: no evidence to quote
    assert answer("Translate this text.", 0) == NO_LABEL
    task = TASKS[record["task"]]
    assert fixture_answer(task, P.raw_post(record), record["labels"]) == record["answer"]


@pytest.mark.slow
def test_the_paper_chain_runs_offline_each_step_reading_the_last(tmp_path):
    out = tmp_path / "chain"
    fast = ["stages.one.max_epochs=1", "stages.two.max_epochs=2", "generation.max_new_tokens=24"]
    cmd = [sys.executable, "-m", "mentalglm.commands.paper_chain", "--out", str(out), *fast]
    env = {**cli_env(tmp_path / "unused"), "MENTALGLM_C_IMHI": str(tmp_path / "nowhere")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (out / "chain.log").read_text()[-5000:]

    # 1-2. The teacher's build, the disagreements revised by the experts and merged back: nothing left pending.
    build = out / "build"
    report = json.loads((build / "build_report.json").read_text())
    with open(build / "revision.csv", encoding="utf-8") as f:
        sheet = list(csv.DictReader(f))
    assert sheet and all(r["status"] == "disagreed" and r["revised_answer"] for r in sheet)
    assert report["revisions"][-1]["merged"] == len(sheet) and (build / "pending.jsonl").read_text() == ""
    test_rows = load_records(None, build / "test.jsonl")
    train = [json.loads(line) for line in (build / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sum(r["provenance"]["revised"] for r in train) == sum(r["split"] == "train" for r in sheet)
    assert {r["task"] for r in test_rows} == {"sos_hl_1k", "socialcd_3k", "cp"}

    # 3. One sweep job per variant, each tested on the build's test split.
    jobs = {OmegaConf.load(c).variant: c.parent.parent for c in (out / "sweep").glob("*/.hydra/config.yaml")}
    assert sorted(jobs) == ["full", "s1", "s2"] and (out / "sweep" / "ablation.md").is_file()
    for job in jobs.values():
        metrics = json.loads((job / "test" / "metrics.json").read_text())
        assert set(metrics["data"]["files"].values()) == {str(build / "test.jsonl")}
        assert metrics["sos_hl_1k"]["n"] == sum(r["task"] == "sos_hl_1k" for r in test_rows)

    # 4-6. Classifier, evaluation with the fallback and the expert sample, all from the full run's directory.
    log = (out / "chain.log").read_text()
    for step in ("classifier", "evaluate", "expert_sample"):
        assert f"===== {step}: " in log and f"run_dir={jobs['full']}" in log.split(f"===== {step}: ")[1].split("\n")[0]
    evaluation = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert evaluation["fallback"]["classifier"] == str(out / "classifier")
    full_test = json.loads((jobs["full"] / "test" / "metrics.json").read_text())
    assert evaluation["sos_hl_1k"]["n"] == full_test["sos_hl_1k"]["n"]
    assert len(list((out / "expert_sample" / "sheets").glob("rater_*.csv"))) == 2

    # 7. The paper's tables: Table 3 from the three jobs, each row saying its data and n.
    table3 = json.loads((out / "report" / "paper_table3.json").read_text())
    assert [r["paper"] for r in table3["rows"]] == ["MentalGLM-chat-S1", "MentalGLM-chat-S2", "MentalGLM-chat"]
    for row, variant in zip(table3["rows"], ("s1", "s2", "full")):
        metrics = json.loads((jobs[variant] / "test" / "metrics.json").read_text())
        assert row["cells"]["sos_hl_1k"][0] == pytest.approx(100 * metrics["sos_hl_1k"]["f1"])
        assert row["n"]["socialcd_3k"] == metrics["socialcd_3k"]["n"] and row["source"]["name"] == "fixtures"
    for table in ("table3", "table4", "tableS1"):
        text = (out / "report" / f"paper_{table}.md").read_text()
        assert f"test split: {build / 'test.jsonl'}; n = SOS-HL-1K " in text and text in proc.stdout
    assert "rehearsal of the pipeline on synthetic fixtures" in proc.stdout.splitlines()[-1]


def test_the_chain_never_writes_over_another(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "mentalglm.commands.paper_chain", "--out", str(tmp_path)],
        cwd=ROOT,
        env=cli_env(tmp_path / "outputs"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --out {tmp_path} already holds files: give a new folder (a chain never writes over another)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
