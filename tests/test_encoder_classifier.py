"""The encoder classifier (train_classifier.py classifier=<a BERT-family config>) on a tiny random BERT."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from mentalglm.models.tiny_bert import ensure_tiny_bert
from mentalglm.tasks import TASKS


def test_the_tiny_bert_loads_like_a_hub_encoder_and_tokenises_chinese_by_character(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = ensure_tiny_bert(tmp_path, corpus=["他觉得自己一无是处", "I feel hopeless and alone"] * 5, hidden_size=32)
    assert (
        ensure_tiny_bert(tmp_path, corpus=["他觉得自己一无是处", "I feel hopeless and alone"] * 5, hidden_size=32)
        == path
    )
    tok = AutoTokenizer.from_pretrained(path)
    pieces = tok.convert_ids_to_tokens(tok("他觉得 hopeless")["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and pieces[1:4] == ["他", "觉", "得"]
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    assert model.config.model_type == "bert" and model(**tok(["他"], return_tensors="pt")).logits.shape == (1, 3)


def test_every_table_4_encoder_is_a_config_with_a_hub_id_and_appendix_c_settings():
    from hydra import compose, initialize_config_dir

    from mentalglm.config import register_configs

    register_configs()
    hub = {
        "bert_base_chinese": "google-bert/bert-base-chinese",
        "chinese_bert_wwm_ext": "hfl/chinese-bert-wwm-ext",
        "chinese_roberta_wwm_ext": "hfl/chinese-roberta-wwm-ext",
        "chinese_mentalbert": "zwzzz/Chinese-MentalBERT",
    }
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for name, hub_id in hub.items():
            clf = compose("train_classifier", overrides=[f"classifier={name}"]).classifier
            assert (clf.kind, clf.pretrained, clf.name) == ("encoder", hub_id, name)
            assert (clf.epochs, clf.batch_size, clf.lr) == (10, 16, 2e-5)


def test_multi_label_encoders_predict_labels_above_the_threshold_in_task_order():
    import torch

    from mentalglm.scoring.encoder import EncoderLabeler

    cd, dr = TASKS["socialcd_3k"], TASKS["dr"]
    multi = EncoderLabeler(cd, list(cd.labels), torch.nn.Linear(1, 1), tokenizer=None, threshold=0.5)
    logits = torch.full((2, len(cd.labels)), -5.0)
    logits[0, 4], logits[0, 1], logits[1, 0] = 2.0, 0.1, 0.0  # sigmoid(0) = 0.5 is not above the threshold
    assert multi.decode(logits) == [[cd.labels[1], cd.labels[4]], []]
    single = EncoderLabeler(dr, ["no", "yes"], torch.nn.Linear(1, 1), tokenizer=None)
    assert single.decode(torch.tensor([[0.2, 0.1], [-1.0, 3.0]])) == [["no"], ["yes"]]


@pytest.mark.slow
def test_encoder_trains_on_explanations_reports_table_s1_and_labels_what_the_parser_cannot_read(run_cli, tmp_path):
    """One code path, two uses: explanation -> label (consistency classifier, label fallback) and post -> label."""
    from mentalglm.data.paths import FIXTURES_DIR
    from mentalglm.data.splits import build_splits
    from mentalglm.scoring.parsing import explanation_part

    clf = tmp_path / "clf"
    expert = FIXTURES_DIR / "imhi/dr/val.csv"  # stands in for an expert-example file (any readable format)
    run_cli(
        "train_classifier.py",
        "data=fixtures",
        "data.select=[dr]",
        "classifier=tiny_bert",
        f"+examples.dr={expert}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"output_dir={clf}",
    )
    doc = json.loads((clf / "classifier.json").read_text())
    assert doc["kind"] == "encoder" and doc["tasks"]["dr"]["encoder"] == "encoders/dr"
    assert doc["training"]["dr"]["best_checkpoint"].endswith(".ckpt") and not (clf / ".checkpoints").exists()
    assert (clf / "encoders/dr/model.safetensors").is_file()
    metrics = json.loads((clf / "metrics.json").read_text())
    assert metrics["val"]["dr"]["f1"] > 0.8 and metrics["expert"]["dr"]["n"] == metrics["val"]["dr"]["n"]
    results = (clf / "results.md").read_text()
    assert "Table S1" in results and "Majority F1" in results
    assert (clf / "csv").is_dir()  # the per-epoch validation F1 went to the configured logger

    # The fallback reads answers that never state their label, as real fine-tuned models often write them.
    specs = {"dr": {"train": FIXTURES_DIR / "imhi/dr/train.csv", "val": expert}}
    val = build_splits(specs, seed=0)["val"]
    rows = [
        {
            "task": "dr",
            "id": r["id"],
            "labels": r["labels"],
            "output": "Reasoning: " + explanation_part(TASKS["dr"], r["answer"]),
        }
        for r in val
    ]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    run_cli("evaluate.py", f"predictions={preds}", f"label_fallback={clf}", f"output_dir={out}")
    fallback = json.loads((out / "metrics.json").read_text())["fallback"]["dr"]
    assert fallback["fallback_rate"] == 1.0 and fallback["f1"] == pytest.approx(metrics["val"]["dr"]["f1"])

    # A classifier for another label set, or one whose weights are gone: one line each.
    doc["tasks"]["dr"]["classes"] = ["no", "maybe"]
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited/classifier.json").write_text(json.dumps(doc))
    proc = run_cli("evaluate.py", f"predictions={preds}", f"label_fallback={tmp_path / 'edited'}", check=False)
    assert proc.returncode == 2 and "knows labels ['maybe'] the task has not" in proc.stderr.strip().splitlines()[-1]
    doc["tasks"]["dr"]["classes"] = ["no", "yes"]
    (tmp_path / "edited/classifier.json").write_text(json.dumps(doc))
    proc = run_cli("evaluate.py", f"predictions={preds}", f"label_fallback={tmp_path / 'edited'}", check=False)
    assert proc.returncode == 2 and "its dr encoder is missing" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_post_baselines_cover_hierarchical_tasks_and_bad_settings_end_in_one_line(run_cli, tmp_path):
    out = tmp_path / "baseline"
    run_cli(
        "train_classifier.py",
        "data=fixtures",
        "data.select=[cp]",
        "input=post",
        "classifier=tiny_bert",
        "classifier.epochs=20",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"output_dir={out}",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) == {"cp_parent", "cp_child"} and metrics["test"]["cp_parent"]["f1"] > 0
    assert "| CP (parent) |" in (out / "results.md").read_text()
    for args, message in (
        (["classifier.kind=bert"], "classifier.kind='bert' is not one of tfidf, encoder"),
        (["classifier=chinese_mentalbert", "classifier.pretrained=null"], "classifier.pretrained is empty"),
        (["classifier=chinese_mentalbert", f"classifier.pretrained={tmp_path / 'none'}"], "could not be loaded"),
        (["+examples.nosuch=x.csv"], "examples name tasks that do not exist: nosuch"),
    ):
        proc = run_cli(
            "train_classifier.py",
            "data=fixtures",
            "data.select=[dr]",
            f"output_dir={tmp_path / 'x'}",
            *args,
            check=False,
        )
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
        assert not (tmp_path / "x" / "classifier.json").exists()


@pytest.mark.slow
@pytest.mark.real_data
def test_the_encoder_trains_on_real_imhi_explanations_and_scores_the_expert_examples(run_cli, tmp_path):
    from mentalglm.data.paths import shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("needs ../shared/data")
    out = tmp_path / "clf"
    run_cli(
        "train_classifier.py",
        "data=shared",
        "data.select=[dreaddit]",
        "expert_examples=imhi",
        "classifier=tiny_bert",
        "classifier.epochs=1",
        "classifier.max_length=96",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"output_dir={out}",
        timeout=900,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["dreaddit"]["n"] == 300 and metrics["expert"]["dreaddit"]["n"] == 35
    assert "| Dreaddit |" in (out / "results.md").read_text().split("Table S1")[1]
