"""Explanation text metrics against the reference explanations: BLEU-4, ROUGE-1/2/L and length.

The texts compared are the explanations (the part after the explanation marker) of a model's answer and of
the gold answer. Chinese has no spaces, so a whitespace tokenizer scores it as one token per sentence:
`tokenizer="char"` (default) makes every CJK character a token and keeps runs of Latin letters and digits
whole; `jieba` segments words (`pip install jieba`); `whitespace` splits on spaces (English). The metrics are
torchmetrics' (BLEUScore: corpus BLEU-4 without smoothing; ROUGEScore: mean F-measure over the pairs) on the
tokens joined by spaces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from mentalglm.errors import ConfigError
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


def explanation_metrics(
    predictions: Sequence[str], references: Sequence[str], language: str, tokenizer: str = "char"
) -> dict[str, float]:
    """{bleu4, rouge1, rouge2, rougeL (F-measure, 0-1), length, reference_length (mean tokens), n}."""
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
    return {
        "bleu4": float(bleu),
        "rouge1": float(rouge["rouge1_fmeasure"]),
        "rouge2": float(rouge["rouge2_fmeasure"]),
        "rougeL": float(rouge["rougeL_fmeasure"]),
        "length": sum(len(p.split()) for p in pred) / n,
        "reference_length": sum(len(r.split()) for r in ref) / n,
        "n": n,
    }


def explanation_report(
    rows: Sequence[dict], tasks: Mapping[str, Task], tokenizer: str = "char", references: Mapping | None = None
) -> dict[str, dict]:
    """Per task, the metrics of the rows whose gold answer carries an explanation: a row's `reference`, or
    `references[(task, id, aspect)]` (the datamodule's, for generated rows)."""
    from mentalglm.scoring.parsing import explanation_part

    pairs: dict[str, tuple[list[str], list[str]]] = {}
    for r in rows:
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
    return {name: explanation_metrics(p, g, tasks[name].language, tokenizer) for name, (p, g) in pairs.items()}


def explanation_markdown(report: Mapping[str, dict], names: Mapping[str, str]) -> list[str]:
    lines = [
        "## Explanations against the reference explanations",
        "",
        "| Task | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | Length | Reference length | n |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in report.items():
        if m.get("n"):
            lines.append(
                f"| {names.get(name, name)} | {100 * m['bleu4']:.2f} | {100 * m['rouge1']:.2f} | "
                f"{100 * m['rouge2']:.2f} | {100 * m['rougeL']:.2f} | {m['length']:.1f} | "
                f"{m['reference_length']:.1f} | {m['n']} |"
            )
    return [*lines, ""]
