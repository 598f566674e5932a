"""Explanation text metrics against the reference explanations: BLEU-4, ROUGE-1/2/L and length.

The texts compared are the explanations (the part after the explanation marker) of a model's answer and of
the gold answer. Chinese has no spaces, so a whitespace tokenizer scores it as one token per sentence:
`tokenizer="char"` (default) makes every CJK character a token and keeps runs of Latin letters and digits
whole; `jieba` segments words (`pip install jieba`); `whitespace` splits on spaces (English). The metrics are
torchmetrics' (BLEUScore: corpus BLEU-4 without smoothing; ROUGEScore: mean F-measure over the pairs) on the
tokens joined by spaces.

BERTScore (optional: `explanation_bertscore.model=<hub id or directory>`) is the authors' `bert_score`
package on the raw texts, the encoder's own tokenizer. Not torchmetrics' BERTScore: it leaves [CLS] and [SEP]
out of the greedy match, which lowers recall against the published implementation (README, evaluation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from mentalglm.errors import ConfigError, first_line
from mentalglm.tasks import Task

TOKENIZERS = ("char", "jieba", "whitespace")
_CHAR_TOKEN = re.compile(r"[0-9A-Za-z]+|[^\s0-9A-Za-z]", re.UNICODE)
_PUNCT = re.compile(r"^[\W_]+$", re.UNICODE)


def tokens(text: str, language: str, tokenizer: str = "char") -> list[str]:
    """The tokens the metrics count; punctuation is not a token."""
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"explanation_tokenizer={tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    text = text.lower()
    if tokenizer == "whitespace":
        found = text.split()
    elif tokenizer == "char":  # CJK characters one by one, Latin words and numbers whole (English: words)
        found = _CHAR_TOKEN.findall(text)
    else:
        try:
            import jieba
        except ImportError:
            raise ConfigError("explanation_tokenizer=jieba needs jieba: pip install jieba") from None
        found = [w for w in jieba.lcut(text) if w.strip()]
    return [t for t in found if not _PUNCT.match(t)]


class BertScore:
    """BERTScore with one encoder loaded once: mean precision / recall / F1 of (candidate, reference) pairs."""

    def __init__(self, model: str, num_layers: int | None = None, batch_size: int = 32):
        try:
            from bert_score import BERTScorer
            from bert_score.utils import model2layers
        except ImportError:
            raise ConfigError('explanation_bertscore needs bert-score: pip install -e ".[bertscore]"') from None
        layers = num_layers if num_layers is not None else model2layers.get(model)
        if layers is None:
            raise ConfigError(
                f"explanation_bertscore.num_layers is needed for {model!r} (bert_score knows no default layer for it)"
            )
        try:
            self.scorer = BERTScorer(model_type=model, num_layers=int(layers), batch_size=int(batch_size))
        except OSError as e:
            raise ConfigError(f"explanation_bertscore.model={model!r} could not be loaded: {first_line(e)}") from None
        self.model, self.num_layers = model, int(layers)

    def __call__(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        precision, recall, f1 = self.scorer.score(list(predictions), list(references))
        return {
            "bertscore_precision": float(precision.mean()),
            "bertscore_recall": float(recall.mean()),
            "bertscore_f1": float(f1.mean()),
        }


def explanation_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    language: str,
    tokenizer: str = "char",
    bertscore: BertScore | None = None,
) -> dict[str, float]:
    """{bleu4, rouge1, rouge2, rougeL (F-measure, 0-1), length, reference_length (mean tokens), n}, and with
    `bertscore` its bertscore_precision / _recall / _f1."""
    from torchmetrics.text import BLEUScore, ROUGEScore

    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    pred = [" ".join(tokens(p, language, tokenizer)) for p in predictions]
    ref = [" ".join(tokens(r, language, tokenizer)) for r in references]
    n = len(pred)
    if not n:
        return {"n": 0}
    bleu = BLEUScore(n_gram=4)(pred, [[r] for r in ref])
    rouge = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"), tokenizer=str.split, normalizer=lambda s: s)(
        pred, [[r] for r in ref]
    )
    extra = bertscore(predictions, references) if bertscore is not None else {}
    return {
        **extra,
        "bleu4": float(bleu),
        "rouge1": float(rouge["rouge1_fmeasure"]),
        "rouge2": float(rouge["rouge2_fmeasure"]),
        "rougeL": float(rouge["rougeL_fmeasure"]),
        "length": sum(len(p.split()) for p in pred) / n,
        "reference_length": sum(len(r.split()) for r in ref) / n,
        "n": n,
    }


def explanation_report(
    rows: Sequence[dict],
    tasks: Mapping[str, Task],
    tokenizer: str = "char",
    references: Mapping | None = None,
    bertscore: BertScore | None = None,
) -> dict[str, dict]:
    """Per task, the metrics of the rows whose gold answer carries an explanation: a row's `reference`, or
    `references[(task, id, aspect)]` (the datamodule's, for generated rows)."""
    from mentalglm.scoring.parsing import explanation_part

    pairs: dict[str, tuple[list[str], list[str]]] = {}
    # In item order, whatever order the rows came in (gathered from ranks, resumed): float sums then agree.
    for r in sorted(rows, key=lambda r: (r["task"], r.get("index", 0), str(r.get("id")), r.get("aspect") or "")):
        task = tasks.get(r["task"])
        key = (r["task"], str(r.get("id")), r.get("aspect") or "")
        reference = r.get("reference") if references is None else references.get(key)
        if task is None or not isinstance(reference, str):
            continue
        gold = explanation_part(task, reference)
        if gold:
            preds, refs = pairs.setdefault(r["task"], ([], []))
            preds.append(explanation_part(task, r.get("output") or "") or (r.get("output") or ""))
            refs.append(gold)
    return {
        name: explanation_metrics(p, g, tasks[name].language, tokenizer, bertscore) for name, (p, g) in pairs.items()
    }


def explanation_markdown(report: Mapping[str, dict], names: Mapping[str, str]) -> list[str]:
    bert = any("bertscore_f1" in m for m in report.values())
    lines = [
        "## Explanations against the reference explanations",
        "",
        "| Task | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L |"
        + (" BERTScore F1 |" if bert else "")
        + " Length | Reference length | n |",
        "|---|---:|---:|---:|---:|" + ("---:|" if bert else "") + "---:|---:|---:|",
    ]
    for name, m in report.items():
        if m.get("n"):
            lines.append(
                f"| {names.get(name, name)} | {100 * m['bleu4']:.2f} | {100 * m['rouge1']:.2f} | "
                f"{100 * m['rouge2']:.2f} | {100 * m['rougeL']:.2f} | "
                + (f"{100 * m['bertscore_f1']:.2f} | " if bert else "")
                + f"{m['length']:.1f} | {m['reference_length']:.1f} | {m['n']} |"
            )
    return [*lines, ""]
