"""End-to-end: evaluate.py through Hydra (subprocess): a trained adapter, a run directory, score-only, few-shot."""

import json
from pathlib import Path

import pytest
from conftest import FAST_DEMO

from mentalglm.fixtures import make_fixtures  # noqa: F401  (the fixtures package must be importable)
from mentalglm.tasks import TASKS

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[1] / "mentalglm" / "fixtures"
SCORE_FIXTURE = Path(__file__).parent / "fixtures" / "predictions_small.jsonl"
EVAL = [
    "model=tiny_glm",
    "data=fixtures",
    "trainer=cpu",
    "data.limit_eval=6",
    "generation.max_new_tokens=24",
    "trainer.enable_progress_bar=false",
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def fixture_posts() -> list[str]:
    lines = (FIXTURES / "cp" / "test.txt").read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[0] for line in lines]


def test_trained_adapter_and_run_dir_give_the_train_run_numbers(run_cli, tmp_path):
    run_cli("train.py", *FAST_DEMO, "variant=s2")
    (run,) = sorted((tmp_path / "outputs" / "train").glob("*/runs/*"))
    trained = json.loads((run / "test" / "metrics.json").read_text())
    adapter = json.loads((run / "summary.json").read_text())["best_adapter"]

    out_a, out_b = tmp_path / "eval_adapter", tmp_path / "eval_run"
    run_cli("evaluate.py", *EVAL, f"adapter={adapter}", f"output_dir={out_a}")
    run_cli("evaluate.py", *EVAL, f"run_dir={run}", f"hydra.run.dir={out_b}")
    for out in (out_a, out_b):
        metrics = json.loads((out / "metrics.json").read_text())
        for key in ("sos_hl_1k", "socialcd_3k", "cp_parent", "cp_child"):
            assert metrics[key]["f1"] == pytest.approx(trained[key]["f1"]), key  # greedy: same numbers
        rows = read_jsonl(out / "predictions.jsonl")
        assert {"task", "id", "output", "gold_labels", "pred_labels", "parsed"} <= set(rows[0])
        assert {r["parser"] for r in rows} == {"strict"}  # a fine-tuned adapter writes the label sentence first
        assert "query" not in rows[0]  # no raw post text unless save_inputs=true
        assert "| CP (child) |" in (out / "results.md").read_text()
        assert (out / "sos_hl_1k_confusion.png").is_file() and (out / "cp_child_per_label_f1.png").is_file()
    assert not any(post in (out_a / "predictions.jsonl").read_text(encoding="utf-8") for post in fixture_posts())

    out_c = tmp_path / "eval_inputs"
    run_cli("evaluate.py", *EVAL, f"adapter={adapter}", f"output_dir={out_c}", "save_inputs=true", "data.select=[cp]")
    rows = read_jsonl(out_c / "predictions.jsonl")
    assert {r["task"] for r in rows} == {"cp"} and all(r["query"] for r in rows)
    assert not any(TASKS["cp"].description_text() in r["query"] for r in rows)  # not what it was trained on


def test_score_only_cli(run_cli, tmp_path):
    out = tmp_path / "scored"
    run_cli("evaluate.py", f"predictions={SCORE_FIXTURE}", f"output_dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sos_hl_1k"]["f1"] == pytest.approx(0.5) and metrics["cp_parent"]["f1"] == pytest.approx(6 / 7)
    assert len(read_jsonl(out / "scored.jsonl")) == 16 and (out / "results.md").is_file()


def test_few_shot_baseline_without_adapter(run_cli, tmp_path):
    out = tmp_path / "fewshot"
    run_cli("evaluate.py", *EVAL, "shots=2", "data.select=[sos_hl_1k]", f"output_dir={out}", "save_inputs=true")
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == 6 and {r["task"] for r in rows} == {"sos_hl_1k"}
    # Two solved examples from the train split precede the question.
    assert all(r["query"].count("该帖子的发布者有") >= 2 for r in rows)
    assert {r["parser"] for r in rows} == {"free"}  # a base model answers in its own words
    # ... and is told the labels first (data.task_description: null = for base models)
    described = TASKS["sos_hl_1k"].description_text()
    assert all(described in r["query"] and r["query"].index(described) < r["query"].index("示例1") for r in rows)
    assert "2-shot" in (out / "results.md").read_text()


def test_extra_dataset_with_same_schema(run_cli, tmp_path):
    """A new CP-format file (e.g. a clinical set) evaluates by pointing the config at it."""
    clinical = tmp_path / "clinical_cp.txt"
    clinical.write_text(
        "".join((FIXTURES / "cp" / "test.txt").read_text(encoding="utf-8").splitlines(True)[:5]), encoding="utf-8"
    )
    out = tmp_path / "clinical"
    run_cli("evaluate.py", *EVAL, "data.select=[cp]", f"data.tasks.cp.test={clinical}", f"output_dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cp_parent"]["n"] == 5 and metrics["cp_child"]["n"] == 5


def test_bad_adapter_path_is_one_line(run_cli, tmp_path):
    proc = run_cli("evaluate.py", *EVAL, f"adapter={tmp_path / 'nope'}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "is not a LoRA adapter directory" in proc.stderr.strip().splitlines()[-1]


def test_clinical_data_is_a_cp_test_file_alone(run_cli, tmp_path):
    """data=clinical: a CP-format test file, no train or val; scored like CP, laid out as Table 5."""
    from mentalglm.data.paths import FIXTURES_DIR

    out = tmp_path / "clinical"
    clinical = [e for e in EVAL if e != "data=fixtures"] + [
        "data=clinical",
        f"data.tasks.cp.test={FIXTURES_DIR / 'cp/test.txt'}",
    ]
    run_cli("evaluate.py", *clinical, f"output_dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"cp_parent", "cp_child"} <= set(metrics) and metrics["cp_parent"]["n"] == 6
    run_cli(
        "evaluate.py",
        "report=paper",
        "table=5",
        f"rows=[{{name: tiny, path: '{out}', paper: GLM-4-9b-chat}}]",
        f"output_dir={out}",
    )
    assert "| Δ tiny − GLM-4-9b-chat |" in (out / "paper_table5.md").read_text()
    # without the file: one line naming the key to set
    proc = run_cli("evaluate.py", *[e for e in clinical if not e.startswith("data.tasks.cp.test")], check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ") and "data.tasks.cp" in last


def test_generated_explanations_are_scored_against_the_gold_ones(run_cli, tmp_path):
    out = tmp_path / "imhi"
    run_cli("evaluate.py", *EVAL, "data.select=[dr]", "split=val", f"output_dir={out}")
    report = json.loads((out / "metrics.json").read_text())["explanations"]["dr"]
    assert report["n"] == 6 and 0 <= report["rougeL"] <= 1 and report["reference_length"] > 0
    assert "## Explanations against the reference explanations" in (out / "results.md").read_text()
    proc = run_cli("evaluate.py", *EVAL, "data.select=[dr]", "explanation_tokenizer=words", check=False)
    assert proc.returncode == 2 and "explanation_tokenizer='words'" in proc.stderr.strip().splitlines()[-1]
