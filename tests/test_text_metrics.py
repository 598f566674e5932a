"""Explanation text metrics against reference implementations (rouge-score, sacrebleu) and definitions (BERTScore)."""

from __future__ import annotations

import json

import pytest

from mentalglm.scoring.text_metrics import explanation_metrics, explanation_report, tokens
from mentalglm.tasks import TASKS

ZH = [
    ("帖子表达了强烈的绝望感，并提到了具体的计划。", "帖子表达了绝望，提到了具体的自杀计划和时间。"),
    ("作者把一次失败推广为总是失败。", "作者由一次考试失败推出自己永远不行，属于以偏概全。"),
    ("没有明显的风险。", "帖子只是在抱怨工作压力，没有自杀意图。"),
]
EN = [
    ("The poster feels hopeless and mentions a plan.", "The poster expresses hopelessness and describes a plan."),
    ("Work stress and no sleep.", "The poster is stressed by deadlines at work and cannot sleep."),
]


def test_chinese_is_tokenized_by_character_and_a_whitespace_tokenizer_would_score_zero():
    assert tokens("帖子提到 suicide plan 3 次。", "zh") == ["帖", "子", "提", "到", "suicide", "plan", "3", "次"]
    pred, ref = ZH[0]
    assert explanation_metrics([pred], [ref], "zh", "whitespace")["rouge1"] == 0.0  # the pitfall
    assert explanation_metrics([pred], [ref], "zh")["rouge1"] > 0.5


@pytest.mark.parametrize("language, pairs", [("zh", ZH), ("en", EN)])
def test_rouge_and_bleu_equal_the_reference_implementations(language, pairs):
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    ours = explanation_metrics(preds, refs, language)
    joined = [(" ".join(tokens(p, language)), " ".join(tokens(r, language))) for p, r in pairs]

    class Spaces:  # rouge-score's own tokenizer drops every non-ASCII character: give it the tokens
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Spaces())
    scores = [scorer.score(r, p) for p, r in joined]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert ours[key] == pytest.approx(sum(s[key].fmeasure for s in scores) / len(scores), abs=1e-6), key
    bleu = BLEU(tokenize="none", smooth_method="none").corpus_score([p for p, _ in joined], [[r for _, r in joined]])
    assert 100 * ours["bleu4"] == pytest.approx(bleu.score, abs=1e-4)
    assert ours["n"] == len(pairs) and ours["length"] == sum(len(p.split()) for p, _ in joined) / len(pairs)


def test_a_bad_tokenizer_is_named():
    from mentalglm.errors import ConfigError

    with pytest.raises(ConfigError, match="explanation_tokenizer='words' is not one of char, jieba, whitespace"):
        tokens("x", "zh", "words")


def zh_rows() -> list[dict]:
    """SOS-HL-1K predictions rows whose answers and references carry the ZH explanations."""
    task = TASKS["sos_hl_1k"]
    return [
        {
            "task": "sos_hl_1k",
            "id": str(i),
            "output": task.format_answer(["高自杀风险"], p),
            "reference": task.format_answer(["高自杀风险"], r),
        }
        for i, (p, r) in enumerate(ZH)
    ]


def test_predictions_with_reference_explanations_get_the_report(tmp_path):
    from mentalglm.reporting.writer import score_predictions_file

    rows = zh_rows()
    rows.append({"task": "sos_hl_1k", "id": "x", "output": "低自杀风险", "reference": "该帖子的发布者有低自杀风险。"})
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    metrics = score_predictions_file(path, tmp_path / "out")
    want = explanation_metrics([p for p, _ in ZH], [r for _, r in ZH], "zh")
    assert metrics["explanations"]["sos_hl_1k"] == pytest.approx(want)  # the label-only reference is not counted
    assert "## Explanations against the reference explanations" in (tmp_path / "out" / "results.md").read_text()
    assert explanation_report(rows[:1], TASKS, references={}) == {}  # generated rows: the datamodule's references


def test_rows_without_ids_are_reported_too():
    task = TASKS["dr"]
    rows = [
        {"task": "dr", "output": task.format_answer(["yes"], p), "reference": task.format_answer(["yes"], r)}
        for p, r in EN
    ]
    assert explanation_report(rows, TASKS)["dr"] == pytest.approx(
        explanation_metrics([p for p, _ in EN], [r for _, r in EN], "en")
    )


def _bertscore_by_hand(model_dir, layer: int, pairs) -> tuple[float, float, float]:
    """BERTScore as its paper and the authors' package define it, written out: cosine similarity of layer-`layer`
    token embeddings, each token matched greedily to the most similar token of the other text ([CLS] and [SEP]
    can be matched but carry no weight), precision over the candidate's tokens, recall over the reference's."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()

    def embed(text):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states[layer][0]
        return torch.nn.functional.normalize(hidden, dim=-1)

    ps, rs, fs = [], [], []
    for cand, ref in pairs:
        c, r = embed(cand), embed(ref)
        sim = c @ r.T
        p = sim.max(dim=1).values[1:-1].mean().item()  # the candidate's own tokens, not [CLS] / [SEP]
        rec = sim.max(dim=0).values[1:-1].mean().item()
        ps, rs, fs = ps + [p], rs + [rec], fs + [2 * p * rec / (p + rec)]
    return sum(ps) / len(ps), sum(rs) / len(rs), sum(fs) / len(fs)


@pytest.mark.parametrize("pairs", [ZH, EN], ids=["zh", "en"])
def test_bertscore_equals_its_definition_on_a_tiny_encoder(tmp_path, pairs):
    from mentalglm.models.tiny_bert import ensure_tiny_bert
    from mentalglm.scoring.text_metrics import BertScore

    model_dir = str(ensure_tiny_bert(tmp_path, corpus=[t for pair in ZH + EN for t in pair] * 3, hidden_size=32))
    got = explanation_metrics(
        [p for p, _ in pairs], [r for _, r in pairs], "zh", bertscore=BertScore(model_dir, num_layers=2)
    )
    want = _bertscore_by_hand(model_dir, 2, pairs)
    assert (got["bertscore_precision"], got["bertscore_recall"], got["bertscore_f1"]) == pytest.approx(want, abs=1e-5)


def test_evaluate_reports_bertscore_and_a_bad_encoder_setting_is_one_line(run_cli, tmp_path):
    from mentalglm.models.tiny_bert import ensure_tiny_bert

    model_dir = ensure_tiny_bert(tmp_path / "enc", corpus=[t for pair in ZH for t in pair] * 3, hidden_size=32)
    rows = zh_rows()
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    run_cli(
        "evaluate.py",
        f"predictions={path}",
        f"explanation_bertscore.model={model_dir}",
        "explanation_bertscore.num_layers=2",
        f"output_dir={out}",
    )
    report = json.loads((out / "metrics.json").read_text())["explanations"]["sos_hl_1k"]
    assert 0 < report["bertscore_f1"] <= 1 and report["n"] == 3
    assert "BERTScore F1" in (out / "results.md").read_text()
    for args, message in (
        ([f"explanation_bertscore.model={model_dir}"], "explanation_bertscore.num_layers is needed"),
        (
            [f"explanation_bertscore.model={tmp_path / 'none'}", "explanation_bertscore.num_layers=2"],
            "could not be loaded",
        ),
    ):
        proc = run_cli("evaluate.py", f"predictions={path}", *args, f"output_dir={tmp_path / 'bad'}", check=False)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]


def test_torchmetrics_bertscore_keeps_special_tokens_out_of_the_match_and_so_scores_lower_recall(tmp_path):
    """Why the package is bert_score: torchmetrics' BERTScore gives another recall than the published one."""
    from torchmetrics.text.bert import BERTScore as TorchmetricsBERTScore

    from mentalglm.models.tiny_bert import ensure_tiny_bert
    from mentalglm.scoring.text_metrics import BertScore

    model_dir = str(ensure_tiny_bert(tmp_path, corpus=[t for pair in ZH + EN for t in pair] * 3, hidden_size=32))
    cand, ref = ["the poster feels hopeless"], ["the poster feels hopeless and mentions a plan"]
    ours = BertScore(model_dir, num_layers=2)(cand, ref)
    theirs = TorchmetricsBERTScore(model_name_or_path=model_dir, num_layers=2)(cand, ref)
    assert ours["bertscore_precision"] == pytest.approx(float(theirs["precision"]), abs=1e-4)
    assert float(theirs["recall"]) < ours["bertscore_recall"] - 1e-3
    assert ours["bertscore_recall"] == pytest.approx(
        _bertscore_by_hand(model_dir, 2, list(zip(cand, ref)))[1], abs=1e-5
    )
