"""Label likelihoods (runtime/likelihood.py) and calibrated risk scores (scoring/calibration.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mentalglm.data.render import render_prompt
from mentalglm.runtime.likelihood import LabelScorer, SharedPrompts, continuation_ids
from mentalglm.scoring.calibration import (
    Calibration,
    TaskScores,
    calibrate_rows,
    fit_calibration,
    probability_metrics,
    triage,
)
from mentalglm.tasks import TASKS

POSTS = ["最近好累，什么都不想做", "今天和朋友去吃饭了", "我总是把事情搞砸，大家一定都讨厌我", "好"]


def naive_log_likelihood(model, prompt: list[int], continuation: list[int]) -> float:
    """One unpadded forward of prompt + continuation, no cache."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt + continuation])).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + t, c]) for t, c in enumerate(continuation))


def prompts_of(tokenizer, task_name: str, posts=POSTS) -> list[list[int]]:
    task = TASKS[task_name]
    return [render_prompt(tokenizer, task.format_query(p)[0], chat=False) for p in posts]


def test_shared_prompt_scores_equal_a_full_forward_of_each_candidate(tiny_model, tiny_hf_tokenizer):
    tok, task = tiny_hf_tokenizer, TASKS["sos_hl_1k"]
    prompts = prompts_of(tok, "sos_hl_1k")  # of different lengths: the shared pass left-pads them
    candidates = [continuation_ids(tok, task.label_sentence([lab]), chat=False) for lab in task.labels]
    extra = [continuation_ids(tok, "该帖子", chat=False), []]  # candidates of other lengths, and an empty one
    wanted = [candidates + extra if i % 2 == 0 else candidates for i in range(len(prompts))]
    got = SharedPrompts(tiny_model, prompts, tok.pad_token_id, max_positions=40).score(wanted)
    for p, cands, scores in zip(prompts, wanted, got):
        naive = [naive_log_likelihood(tiny_model, p, c) if c else 0.0 for c in cands]
        assert scores == pytest.approx(naive, rel=1e-6, abs=1e-5)
        shared_probs = torch.tensor(scores[:2], dtype=torch.float64).softmax(0)
        naive_probs = torch.tensor(naive[:2], dtype=torch.float64).softmax(0)
        assert torch.allclose(shared_probs, naive_probs, atol=1e-5)


def test_single_label_probabilities_sum_to_one_and_predict_the_argmax(tiny_model, tiny_hf_tokenizer):
    scorer = LabelScorer(tiny_hf_tokenizer, {"sos_hl_1k": TASKS["sos_hl_1k"], "sad": TASKS["sad"]}, chat=False)
    prompts = prompts_of(tiny_hf_tokenizer, "sos_hl_1k")[:2] + prompts_of(tiny_hf_tokenizer, "sad")[:2]
    out = scorer(tiny_model, prompts, ["sos_hl_1k", "sos_hl_1k", "sad", "sad"])
    for s, name in zip(out, ["sos_hl_1k", "sos_hl_1k", "sad", "sad"]):
        assert set(s.probs) == set(TASKS[name].labels)
        assert sum(s.probs.values()) == pytest.approx(1.0, abs=1e-9)
        assert s.labels == [max(s.probs, key=s.probs.get)]


def test_multi_label_probabilities_follow_the_label_list(tiny_model, tiny_hf_tokenizer):
    """Each label's probability is that of its tokens next, after the labels taken before it; a label that begins
    another (CP's parents) counts only when the joiner or the closing text follows it."""
    tok = tiny_hf_tokenizer

    def ll(prompt, text):
        return naive_log_likelihood(tiny_model, prompt, continuation_ids(tok, text, chat=False))

    task = TASKS["socialcd_3k"]
    prompt = prompts_of(tok, "socialcd_3k")[2]
    (s,) = LabelScorer(tok, {"socialcd_3k": task}, chat=False)(tiny_model, [prompt], ["socialcd_3k"])
    assert set(s.probs) == set(task.labels) and all(0 <= p <= 1 for p in s.probs.values())
    assert s.labels == [lab for lab in task.labels if s.probs[lab] > 0.5]
    prefix, _, closing = task.answer_template.partition("{labels}")
    first = task.labels[0]
    assert s.probs[first] == pytest.approx(math.exp(ll(prompt, prefix + first) - ll(prompt, prefix)), rel=1e-4)

    cp = TASKS["cp"]
    prompt = prompts_of(tok, "cp")[0]
    (s,) = LabelScorer(tok, {"cp": cp}, chat=False)(tiny_model, [prompt], ["cp"])
    prefix, _, closing = cp.answer_template.partition("{labels}")
    parent = cp.labels[0]  # 触发性事件, which 触发性事件-疾病症状 and its siblings begin with
    base = ll(prompt, prefix)
    want = math.exp(ll(prompt, prefix + parent + "、") - base) + math.exp(ll(prompt, prefix + parent + closing) - base)
    assert s.probs[parent] == pytest.approx(min(1.0, want), rel=1e-4, abs=1e-12)


def test_hierarchical_tasks_get_a_probability_per_parent_and_leaf(tiny_model, tiny_hf_tokenizer):
    task = TASKS["cp"]
    (s,) = LabelScorer(tiny_hf_tokenizer, {"cp": task}, chat=False)(
        tiny_model, prompts_of(tiny_hf_tokenizer, "cp")[:1], ["cp"]
    )
    assert list(s.probs) == list(task.labels) and len(task.labels) == 4 + 19


def test_chat_candidates_are_the_answer_ids_training_renders(tiny_hf_tokenizer):
    from mentalglm.data.render import encode_example

    task = TASKS["sos_hl_1k"]
    sentence = task.label_sentence(["高自杀风险"])
    record = {"query": "考虑以下帖子", "answer": sentence + "推理：很累"}
    encoded = encode_example(tiny_hf_tokenizer, record, chat=True)
    answer = encoded["input_ids"][encoded["prompt_length"] :]
    ids = continuation_ids(tiny_hf_tokenizer, sentence, chat=True)
    assert ids and answer[: len(ids)] == ids


# ----------------------------------------------------------------------------- metrics against references
def random_binary(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    p_pos = (torch.rand(n, generator=g, dtype=torch.float64) * 0.6 + 0.4 * y).clamp(0.01, 0.99)
    task = TASKS["sos_hl_1k"]  # labels [低, 高], positive 高 (index 1)
    return TaskScores(task, torch.stack([1 - p_pos, p_pos], 1), y), p_pos, y


def test_binary_metrics_equal_scikit_learns():
    sklearn = pytest.importorskip("sklearn.metrics")
    scores, p, y = random_binary()
    m = probability_metrics(scores)
    assert m["auroc"] == pytest.approx(sklearn.roc_auc_score(y, p), abs=1e-6)
    assert m["auprc"] == pytest.approx(sklearn.average_precision_score(y, p), abs=1e-6)
    assert m["brier"] == pytest.approx(sklearn.brier_score_loss(y, p), abs=1e-9)
    assert m["nll"] == pytest.approx(sklearn.log_loss(y, p), abs=1e-9)


def test_multiclass_and_multilabel_metrics_equal_scikit_learns():
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    task = TASKS["sad"]
    c = len(task.labels)
    probs = torch.rand(400, c, generator=g, dtype=torch.float64).softmax(1)
    y = torch.randint(0, c, (400,), generator=g)
    m = probability_metrics(TaskScores(task, probs, y))
    assert m["nll"] == pytest.approx(sklearn.log_loss(y, probs, labels=list(range(c))), abs=1e-9)
    assert m["auroc"] == pytest.approx(sklearn.roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-6)
    onehot = torch.nn.functional.one_hot(y, c).double()
    assert m["brier"] == pytest.approx(float(((probs - onehot) ** 2).sum(1).mean()), abs=1e-12)

    ml = TASKS["socialcd_3k"]
    p = torch.rand(200, len(ml.labels), generator=g, dtype=torch.float64)
    t = (torch.rand(200, len(ml.labels), generator=g) < p).double()
    m = probability_metrics(TaskScores(ml, p, t))
    assert m["auroc"] == pytest.approx(sklearn.roc_auc_score(t, p, average="macro"), abs=1e-6)
    assert m["auprc"] == pytest.approx(sklearn.average_precision_score(t, p, average="macro"), abs=1e-6)
    assert m["brier"] == pytest.approx(sklearn.brier_score_loss(t.flatten(), p.flatten()), abs=1e-9)


def test_ece_equals_a_hand_computed_value():
    task = TASKS["sos_hl_1k"]
    # Top-label confidences 0.95, 0.95 (one right), 0.65 (right), 0.55 (wrong): bins [0.933, 1], [0.6, 0.667),
    # [0.533, 0.6) -> ECE = (2|0.95 - 0.5| + |0.65 - 1| + |0.55 - 0|) / 4.
    probs = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.35, 0.65], [0.55, 0.45]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    expected = (2 * 0.45 + 0.35 + 0.55) / 4
    assert probability_metrics(TaskScores(task, probs, y))["ece"] == pytest.approx(expected, abs=1e-6)


def test_temperature_lowers_the_nll_of_an_over_confident_set_and_keeps_the_argmax():
    g = torch.Generator().manual_seed(2)
    task = TASKS["sad"]
    c = len(task.labels)
    y = torch.randint(0, c, (500,), generator=g)
    logits = torch.randn(500, c, generator=g, dtype=torch.float64)
    logits[torch.arange(500), y] += 1.0  # right 60% of the time ...
    over = TaskScores(task, (logits * 4).softmax(1), y)  # ... but sure of itself
    cal = fit_calibration(over, "temperature")
    after = cal.apply(over)
    assert cal.temperature > 2
    assert probability_metrics(after)["nll"] < probability_metrics(over)["nll"]
    assert torch.equal(after.probs.argmax(1), over.probs.argmax(1))
    assert probability_metrics(after)["ece"] < probability_metrics(over)["ece"]


def test_platt_and_temperature_on_yes_no_decisions():
    scores, _, _ = random_binary(seed=3)
    sharp = TaskScores(scores.task, (scores.probs.log() * 5).softmax(1), scores.target)
    for method in ("temperature", "platt"):
        cal = fit_calibration(sharp, method)
        assert probability_metrics(cal.apply(sharp))["nll"] < probability_metrics(sharp)["nll"]
    ml = TASKS["socialcd_3k"]
    g = torch.Generator().manual_seed(4)
    p = torch.rand(100, len(ml.labels), generator=g, dtype=torch.float64)
    t = (torch.rand(100, len(ml.labels), generator=g) < p).double()
    sharp = TaskScores(ml, torch.sigmoid(torch.logit(p) * 4), t)
    cal = fit_calibration(sharp, "temperature")
    assert cal.temperature > 2 and probability_metrics(cal.apply(sharp))["nll"] < probability_metrics(sharp)["nll"]
    with pytest.raises(Exception, match="multiclass"):
        fit_calibration(TaskScores(TASKS["sad"], torch.full((2, 10), 0.1), torch.tensor([0, 1])), "platt")


def test_triage_threshold_reaches_the_sensitivity_on_validation():
    task = TASKS["sos_hl_1k"]

    def scores(p_pos, y):
        p = torch.tensor(p_pos, dtype=torch.float64)
        return TaskScores(task, torch.stack([1 - p, p], 1), torch.tensor(y))

    val = scores([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.75, 0.1], [1, 1, 1, 1, 1, 0, 0, 0])
    test = scores([0.95, 0.65, 0.5, 0.62, 0.2], [1, 1, 1, 0, 0])
    out = triage(val, test, sensitivity=0.8, ks=(1, 2, 9))
    # 5 validation positives: 0.8 x 5 = 4 must be caught -> threshold = the 4th highest positive, 0.6.
    assert out["threshold"] == pytest.approx(0.6) and out["val_sensitivity"] == pytest.approx(0.8)
    assert out["sensitivity"] == pytest.approx(2 / 3) and out["specificity"] == pytest.approx(1 / 2)
    assert out["precision"] == pytest.approx(2 / 3) and out["flagged"] == 3
    assert out["precision_at_k"] == {"1": 1.0, "2": 1.0}


def test_calibrate_rows_adds_calibrated_scores_and_a_report():
    task = TASKS["sos_hl_1k"]
    g = torch.Generator().manual_seed(5)

    def rows(n, offset):
        out = []
        for i in range(n):
            y = int(torch.randint(0, 2, (1,), generator=g))
            p = min(0.999, max(0.001, 0.5 + (0.45 if y else -0.45) * float(torch.rand(1, generator=g)) ** 0.2))
            p = p if float(torch.rand(1, generator=g)) > 0.2 else 1 - p
            label = task.labels[y]
            out.append(
                {
                    "task": "sos_hl_1k",
                    "id": str(offset + i),
                    "gold_labels": [label],
                    "scores": {task.labels[0]: 1 - p, task.labels[1]: p},
                    "likelihood_labels": [task.labels[int(p > 0.5)]],
                    "pred_labels": [label],
                }
            )
        return out

    test_rows, report, cals = calibrate_rows(rows(200, 0), rows(100, 1000), {"sos_hl_1k": task})
    entry = report["sos_hl_1k"]
    assert all(sum(r["calibrated_scores"].values()) == pytest.approx(1) for r in test_rows)
    assert entry["after"]["nll"] < entry["before"]["nll"] and entry["calibration"]["method"] == "temperature"
    assert entry["after"]["auroc"] == pytest.approx(entry["before"]["auroc"])  # a temperature keeps the ranking
    assert 0.6 < entry["agreement_with_generation"] < 1 and entry["triage"]["threshold"] is not None
    assert isinstance(cals["sos_hl_1k"], Calibration)


# ----------------------------------------------------------------------------- end to end (CLI, server)
@pytest.mark.slow
def test_risk_scores_from_training_to_predict_and_serve(run_cli, tmp_path, cli_cache):
    import csv
    import json

    import httpx
    from conftest import FAST_DEMO
    from serving import MODEL, Server

    run_cli(
        "train.py",
        *FAST_DEMO,
        "variant=s2",
        "data.limit_eval=10",
        "scores.enabled=true",
        "validation.mode=likelihood",
        "callbacks.model_checkpoint.monitor=val/sos_hl_1k/auroc",
        "logger=csv",
    )
    (run,) = sorted((tmp_path / "outputs" / "train").glob("*/runs/*"))
    test = run / "test"
    metrics = json.loads((test / "metrics.json").read_text())
    sos = metrics["scores"]["sos_hl_1k"]
    assert sos["calibration"]["method"] == "temperature" and sos["calibration"]["fitted_on"] == 10
    assert {"ece", "brier", "nll", "auroc", "auprc"} <= set(sos["after"]) and "threshold" in sos["triage"]
    assert set(metrics["scores"]) == {"sos_hl_1k", "socialcd_3k", "cp"}
    assert 0 <= metrics["scores"]["cp"]["agreement_with_generation"] <= 1
    rows = [json.loads(line) for line in (test / "predictions.jsonl").read_text().splitlines()]
    single = [r for r in rows if r["task"] == "sos_hl_1k"]
    assert all(sum(r["scores"].values()) == pytest.approx(1) for r in single)
    assert all(sum(r["calibrated_scores"].values()) == pytest.approx(1) for r in single)
    assert all(set(r["scores"]) == set(TASKS[r["task"]].labels) for r in rows)
    assert {"reliability_sos_hl_1k.png", "roc_sos_hl_1k.png", "pr_sos_hl_1k.png", "reliability_cp.png"} <= {
        p.name for p in test.iterdir()
    }
    results = (test / "results.md").read_text()
    assert "Risk scores from label likelihoods" in results and "not diagnoses" in results and "Triage" in results
    # Validation scored label likelihoods (no generation) and the checkpoint was chosen by their AUROC.
    (log_file,) = (run / "stage_two" / "csv").rglob("metrics.csv")
    with open(log_file) as f:
        aurocs = [float(r["val/sos_hl_1k/auroc"]) for r in csv.DictReader(f) if r.get("val/sos_hl_1k/auroc")]
    summary = json.loads((run / "summary.json").read_text())
    assert len(aurocs) == 2 and summary["stages"]["two"]["best_score"] == pytest.approx(max(aurocs))

    out = tmp_path / "predicted.jsonl"
    run_cli(
        "predict.py",
        *MODEL,
        f"run_dir={run}",
        "text='最近很累，不想活了'",
        "task=sos_hl_1k",
        f"output={out}",
        "scores.enabled=true",
        "generation.max_new_tokens=16",
    )
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["scores"]["calibration"] == "temperature" and sum(row["scores"]["calibrated"].values()) == pytest.approx(
        1
    )
    assert row["scores"]["likely_labels"][0] in TASKS["sos_hl_1k"].labels

    server = Server(tmp_path, cli_cache, None, f"run_dir={run}", "scores.enabled=true", "serve.max_tokens=32")
    try:
        body = httpx.post(
            server.url + "/v1/classify", json={"task": "sos_hl_1k", "text": "最近很累，不想活了"}, timeout=120
        ).json()
    finally:
        server.stop()
    assert body["scores"]["calibrated"] == pytest.approx(row["scores"]["calibrated"], abs=1e-6)
    assert "diagnos" in body["notice"]


# ----------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    "override,message",
    [
        ("scores.calibration=isotonic", "scores.calibration=isotonic is not one of temperature, platt, none"),
        ("validation.mode=sample", "validation.mode=sample is not one of generate, likelihood"),
        ("scores.sensitivity=1.5", "scores.sensitivity=1.5 must be in (0, 1]"),
        ("generation.backend=vllm", "scores.enabled=true needs generation.backend=hf"),
    ],
)
def test_bad_score_settings_are_one_clear_error(override, message):
    from conftest import compose_config

    from mentalglm.checks import check_values
    from mentalglm.errors import ConfigError

    cfg = compose_config(["experiment=demo", "scores.enabled=true", override])
    with pytest.raises(ConfigError) as e:
        check_values(cfg)
    assert message in str(e.value)


def test_a_calibration_file_that_is_missing_or_not_one_is_an_error(tmp_path):
    from mentalglm.errors import ConfigError
    from mentalglm.serving.predictor import load_calibrations

    with pytest.raises(ConfigError, match="does not exist"):
        load_calibrations(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"tasks": {"sos_hl_1k": {"temperature": "hot", "colour": 1}}}')
    with pytest.raises(ConfigError, match="is not a calibration.json"):
        load_calibrations(tmp_path / "bad.json")
    (tmp_path / "good.json").write_text('{"tasks": {"sos_hl_1k": {"method": "temperature", "temperature": 2.0}}}')
    assert load_calibrations(tmp_path / "good.json")["sos_hl_1k"].temperature == 2.0
