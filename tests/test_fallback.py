"""The TF-IDF explanation -> label classifier (train_classifier.py) and evaluate.py label_fallback=."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from mentalglm.scoring.fallback import TfidfLabeler, labelers_json, load_labelers
from mentalglm.tasks import TASKS


def test_single_and_multi_label_classifiers_round_trip_through_json(tmp_path):
    dr, cd = TASKS["dr"], TASKS["socialcd_3k"]
    texts = ["feels hopeless and empty every day", "enjoys the weekend with friends", "cannot sleep, sad, worthless"]
    texts += ["went hiking, happy and calm"]
    single = TfidfLabeler.fit(dr, texts * 3, [["yes"], ["no"], ["yes"], ["no"]] * 3)
    assert single.predict(["hopeless and worthless", "happy weekend hiking"]) == [["yes"], ["no"]]
    zh = [
        "他一次失败就说自己永远不行",
        "他断定别人都在嘲笑他",
        "一次失败就认为永远失败，还觉得别人看不起他",
        "今天天气不错",
    ]
    multi = TfidfLabeler.fit(cd, zh * 3, [["以偏概全"], ["读心术"], ["以偏概全", "读心术"], []] * 3)
    assert multi.predict(["别人都在嘲笑他"]) == [["读心术"]]
    path = tmp_path / "classifier.json"
    path.write_text(labelers_json({"dr": single, "socialcd_3k": multi}), encoding="utf-8")
    loaded = load_labelers(tmp_path, TASKS)  # a run directory works too
    assert loaded["dr"].predict(texts) == single.predict(texts) and loaded["socialcd_3k"].predict(zh) == multi.predict(
        zh
    )


@pytest.mark.real_data
def test_tfidf_fallback_recovers_imhi_labels_from_explanations_alone():
    """The README's figure: trained on IMHI training explanations (label sentence removed), it labels >= 90% of
    the DR, dreaddit and SAD validation explanations (label sentence removed) correctly."""
    import sys

    from mentalglm.data.paths import shared_data_dir
    from mentalglm.data.splits import build_splits
    from mentalglm.scoring.parsing import explanation_part

    if shared_data_dir() is None:
        pytest.skip("needs ../shared/data")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common as C

    specs = {k: v for k, v in C.shared_specs(shared_data_dir()).items() if k in ("dr", "dreaddit", "sad")}
    splits = build_splits(specs, seed=42)
    for name in specs:
        task = TASKS[name]
        train = [r for r in splits["train"] if r["task"] == name]
        val = [r for r in splits["val"] if r["task"] == name]
        labeler = TfidfLabeler.fit(
            task, [explanation_part(task, r["answer"]) for r in train], [r["labels"] for r in train]
        )
        predicted = labeler.predict([explanation_part(task, r["answer"]) for r in val])
        accuracy = sum(p == r["labels"] for p, r in zip(predicted, val)) / len(val)
        assert accuracy >= 0.90, (name, accuracy)


@pytest.mark.slow
def test_label_fallback_labels_what_the_parser_cannot_read(run_cli, tmp_path):
    from mentalglm.data.paths import FIXTURES_DIR
    from mentalglm.data.splits import build_splits
    from mentalglm.scoring.parsing import explanation_part

    clf = tmp_path / "clf"
    run_cli("train_classifier.py", "data=fixtures", "data.select=[dr,sad]", f"output_dir={clf}")
    assert json.loads((clf / "metrics.json").read_text())["val"]["dr"]["n"] > 0
    # Answers that never state the label (as MentaLLaMA's fine-tuned models often write): explanation only
    specs = {
        t: {"train": FIXTURES_DIR / f"imhi/{t}/train.csv", "val": FIXTURES_DIR / f"imhi/{t}/val.csv"}
        for t in ("dr", "sad")
    }
    val = build_splits(specs, seed=0)["val"]
    rows = [
        {
            "task": r["task"],
            "id": r["id"],
            "labels": r["labels"],
            "output": "Reasoning: " + explanation_part(TASKS[r["task"]], r["answer"]),
        }
        for r in val
    ]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    run_cli("evaluate.py", f"predictions={preds}", f"label_fallback={clf}", f"output_dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    for task in ("dr", "sad"):
        assert metrics[task]["parse_rate"] == 0.0  # the rules read nothing
        assert metrics["fallback"][task]["fallback_rate"] == 1.0 and metrics["fallback"][task]["f1"] > 0.5
    scored = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    assert {r["labelled_by"] for r in scored} == {"fallback"} and all(r["fallback_labels"] for r in scored)
    assert "## Label fallback" in (out / "results.md").read_text()
    # bad settings: one line each
    for args, message in (([f"label_fallback={tmp_path / 'nothing'}"], "is not a classifier"),):
        proc = run_cli("evaluate.py", f"predictions={preds}", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
    proc = run_cli("train_classifier.py", "data=fixtures", "data.select=[dr]", "classifier.kind=bert", check=False)
    assert (
        proc.returncode == 2
        and "classifier.kind='bert' is not one of tfidf, encoder" in proc.stderr.strip().splitlines()[-1]
    )


def test_consistency_is_the_share_of_answers_whose_explanation_supports_their_label():
    from mentalglm.scoring.fallback import label_fallback
    from mentalglm.scoring.score import score_records

    dr = TASKS["dr"]
    texts = ["feels hopeless and empty every day", "enjoys the weekend with friends"] * 4
    labeler = TfidfLabeler.fit(dr, texts, [["yes"], ["no"]] * 4)
    rows = [
        {"task": "dr", "id": "a", "labels": ["yes"], "output": "Yes. Reasoning: feels hopeless and empty"},
        {"task": "dr", "id": "b", "labels": ["no"], "output": "Yes. Reasoning: enjoys the weekend with friends"},
        {"task": "dr", "id": "c", "labels": ["no"], "output": "Reasoning: enjoys the weekend"},  # unparsed
    ]
    scored, _ = score_records(rows)
    out, metrics = label_fallback(scored, {"dr": dr}, {"dr": labeler})
    by_id = {r["id"]: r for r in out}
    assert by_id["a"]["explanation_labels"] == ["yes"] and by_id["b"]["explanation_labels"] == ["no"]
    assert by_id["c"]["labelled_by"] == "fallback" and by_id["c"]["fallback_labels"] == ["no"]
    assert metrics["dr"]["consistency"] == 0.5 and metrics["dr"]["consistency_n"] == 2
    assert metrics["dr"]["fallback_rate"] == pytest.approx(1 / 3) and metrics["dr"]["parse_rate"] == 1.0


@pytest.mark.real_data
def test_table_s1_on_the_real_imhi_expert_examples(run_cli, tmp_path):
    """The consistency classifier scored on MentaLLaMA's expert-written explanations (Table S1's second column)."""
    from mentalglm.data.paths import shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("needs ../shared/data")
    out = tmp_path / "clf"
    run_cli("train_classifier.py", "data=shared", "data.select=[dr,sad]", "expert_examples=imhi", f"output_dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {metrics["expert"][t]["n"] for t in ("dr", "sad")} == {35}
    assert all(metrics["val"][t]["f1"] > 0.9 for t in ("dr", "sad"))
    assert "| DR |" in (out / "results.md").read_text().split("Table S1")[1]


def test_an_empty_answer_is_left_unlabelled_and_counted_not_classified():
    from mentalglm.scoring.fallback import fallback_markdown, label_fallback
    from mentalglm.scoring.score import score_records

    dr = TASKS["dr"]
    labeler = TfidfLabeler.fit(dr, ["feels hopeless and empty", "enjoys the weekend"] * 4, [["yes"], ["no"]] * 4)
    rows = [
        {"task": "dr", "id": "a", "labels": ["no"], "output": "Reasoning: enjoys the weekend"},
        {"task": "dr", "id": "b", "labels": ["yes"], "output": "   "},
    ]
    scored, rule = score_records(rows)
    out, metrics = label_fallback(scored, {"dr": dr}, {"dr": labeler})
    assert [r["labelled_by"] for r in out] == ["fallback", "none"] and "fallback_labels" not in out[1]
    assert metrics["dr"]["empty_answers"] == 1 and metrics["dr"]["fallback_rate"] == 0.5
    assert "(1 empty)" in "\n".join(fallback_markdown(rule, metrics, {}))
