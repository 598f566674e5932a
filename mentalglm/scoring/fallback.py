"""An explanation -> label classifier that needs no pretrained weights, and the label fallback it serves.

`TfidfLabeler`: TF-IDF (character 1-3-grams for Chinese, word 1-2-grams for English) + logistic regression
(scikit-learn), one model per task; multi-label and hierarchical tasks get one binary model per label. It is
saved as JSON (vocabulary, idf, weights: no pickle, so loading a file runs no code) and predicts with numpy.
classifier.json holds either kind: an encoder's entry names its safetensors directory (mentalglm/scoring/encoder.py).

`label_fallback`: an answer the rule parser cannot read is labelled by the classifier from its explanation
(the text after the explanation marker, else all of it). The rule-only metrics stay what they are; the
fallback's metrics and rate per task are reported beside them, and so is the label-explanation consistency of
the answers the rules did read: how often the classifier's reading of the explanation is the stated label.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mentalglm.errors import ConfigError
from mentalglm.scoring.parsing import explanation_part
from mentalglm.tasks import SINGLE_LABEL_KINDS, Task

FORMAT = "mentalglm-tfidf-labeler"
VERSION = 1

FALLBACK = "fallback"  # labelled_by of an answer the classifier labelled


def _vectorizer(language: str, vocabulary=None):
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError:
        raise ConfigError('the TF-IDF classifier needs scikit-learn: pip install -e ".[classifier]"') from None

    if language == "zh":  # no word boundaries: character n-grams
        return TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, vocabulary=vocabulary)
    return TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, vocabulary=vocabulary)


class TfidfLabeler:
    """One task's explanation -> label classifier (see the module docstring)."""

    def __init__(self, task: Task, vocabulary: dict[str, int], idf, classes: list[str], coef, intercept):
        self.task, self.classes = task, list(classes)
        self.vocabulary, self.idf = dict(vocabulary), np.asarray(idf, dtype=np.float64)
        self.coef, self.intercept = np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64)

    @property
    def single_label(self) -> bool:
        return self.task.kind in SINGLE_LABEL_KINDS

    @classmethod
    def fit(cls, task: Task, texts: Sequence[str], labels: Sequence[Sequence[str]], c: float = 10.0):
        from sklearn.linear_model import LogisticRegression

        if not texts:
            raise ConfigError(f"task {task.name}: no training texts for the classifier")
        vec = _vectorizer(task.language)
        x = vec.fit_transform(texts)
        if task.kind in SINGLE_LABEL_KINDS:
            y = [lab[0] for lab in labels]
            if len(set(y)) < 2:
                raise ConfigError(f"task {task.name}: the classifier needs at least two labels in its training data")
            model = LogisticRegression(max_iter=2000, C=c).fit(x, y)
            classes = list(model.classes_)
            coef, intercept = model.coef_, model.intercept_
            if len(classes) == 2:  # scikit-learn keeps one row for two classes: the second's logit
                coef, intercept = np.vstack([-coef, coef]) / 2, np.array([-intercept[0], intercept[0]]) / 2
        else:
            classes = list(task.labels)
            rows, bias = [], []
            for label in classes:
                y = np.array([label in lab for lab in labels])
                if y.all() or not y.any():  # never (or always) present: a constant
                    rows.append(np.zeros(x.shape[1]))
                    bias.append(20.0 if y.all() else -20.0)
                    continue
                model = LogisticRegression(max_iter=2000, C=c).fit(x, y)
                rows.append(model.coef_[0])
                bias.append(float(model.intercept_[0]))
            coef, intercept = np.vstack(rows), np.array(bias)
        vocabulary = {term: int(i) for term, i in vec.vocabulary_.items()}
        return cls(task, vocabulary, vec.idf_, classes, coef, intercept)

    def _features(self, texts: Sequence[str]):
        vec = _vectorizer(self.task.language, self.vocabulary)
        vec.idf_ = self.idf
        return vec.transform(texts)

    def predict(self, texts: Sequence[str]) -> list[list[str]]:
        if not texts:
            return []
        logits = self._features(texts) @ self.coef.T + self.intercept
        if self.single_label:
            return [[self.classes[int(i)]] for i in np.asarray(logits).argmax(axis=1)]
        chosen = np.asarray(logits) > 0
        out = []
        for row in chosen:
            labels = [c for c, on in zip(self.classes, row) if on]
            out.append(self.task.order_labels(labels))
        return out

    def to_dict(self) -> dict:
        return {
            "task": self.task.name,
            "kind": self.task.kind,
            "language": self.task.language,
            "classes": self.classes,
            "vocabulary": self.vocabulary,
            "idf": self.idf.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
        }


ENCODERS_DIR = "encoders"


def encoder_dir(name: str) -> str:
    """Where an encoder classifier's weights lie, relative to its classifier.json."""
    return f"{ENCODERS_DIR}/{name}"


def labelers_json(labelers: Mapping, meta: Mapping | None = None) -> str:
    """classifier.json: the classifiers as data (loading it runs no code): TF-IDF weights inline, an encoder's
    directory of safetensors beside the file."""
    from mentalglm.scoring.encoder import EncoderLabeler

    tasks = {
        n: m.to_dict(encoder_dir(n)) if isinstance(m, EncoderLabeler) else m.to_dict() for n, m in labelers.items()
    }
    doc = {"format": FORMAT, "version": VERSION, **dict(meta or {}), "tasks": tasks}
    return json.dumps(doc, ensure_ascii=False)


def load_labelers(path: str | Path, tasks: Mapping[str, Task]) -> dict:
    """The classifiers of a file train_classifier.py wrote (a file, or a run directory holding classifier.json),
    TF-IDF or encoder, each with `predict(texts) -> label lists`."""
    path = Path(path)
    if path.is_dir():
        path = path / "classifier.json"
    if not path.is_file():
        raise ConfigError(f"label_fallback={path} is not a classifier (train one with train_classifier.py)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"label_fallback={path}: not a classifier file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"label_fallback={path}: not a classifier file train_classifier.py wrote")
    out = {}
    for name, m in doc.get("tasks", {}).items():
        if name not in tasks:
            continue
        task = tasks[name]
        if task.kind != m["kind"] or task.language != m["language"]:
            raise ConfigError(f"label_fallback={path}: its {name} classifier is for another task definition")
        unknown = [c for c in m["classes"] if c not in task.label_order]
        if unknown:
            raise ConfigError(f"label_fallback={path}: its {name} classifier knows labels {unknown} the task has not")
        if m.get("classifier", "tfidf") == "encoder":
            out[name] = _load_encoder_labeler(path, task, m)
        else:
            out[name] = TfidfLabeler(task, m["vocabulary"], m["idf"], m["classes"], m["coef"], m["intercept"])
    return out


def _load_encoder_labeler(path: Path, task: Task, m: Mapping):
    from mentalglm.scoring.encoder import EncoderLabeler, load_encoder

    directory = path.parent / m["encoder"]
    if not (directory / "config.json").is_file():
        raise ConfigError(f"label_fallback={path}: its {task.name} encoder is missing ({directory})")
    model, tokenizer = load_encoder(str(directory))
    if model.config.num_labels != len(m["classes"]):
        raise ConfigError(
            f"label_fallback={path}: its {task.name} encoder has {model.config.num_labels} outputs for "
            f"{len(m['classes'])} labels"
        )
    return EncoderLabeler(task, m["classes"], model, tokenizer, m["max_length"], m["threshold"])


def fallback_text(task: Task, output: str) -> str:
    """What the classifier reads of an answer: its explanation, else all of it."""
    return explanation_part(task, output) or output


def label_fallback(rows: list[dict], tasks: Mapping[str, Task], labelers: Mapping):
    """(rows with `labelled_by` and, where the classifier labelled them, `fallback_labels`; {metric key: the
    with-fallback metrics plus `fallback_rate`})."""
    from mentalglm.scoring.metrics import TaskMetrics

    need: dict[str, list[tuple[int, str]]] = {}
    empty: dict[str, int] = {}
    for i, r in enumerate(rows):
        if not r["parsed"] and r["task"] in labelers:
            text = fallback_text(tasks[r["task"]], r.get("output") or "")
            if text.strip():
                need.setdefault(r["task"], []).append((i, text))
            else:  # nothing to read: it stays unlabelled, counted
                empty[r["task"]] = empty.get(r["task"], 0) + 1
    # labelled_by: the parser's rule (stated, choice, negation, ...) for a parsed answer, `fallback` where the
    # classifier labelled it, `none` where nothing did.
    out = [dict(r, labelled_by=(r.get("labelled_by") or "stated") if r["parsed"] else "none") for r in rows]
    for name, items in need.items():
        predicted = labelers[name].predict([text for _, text in items])
        for (i, _), labels in zip(items, predicted):
            out[i] = {**out[i], "fallback_labels": labels, "labelled_by": FALLBACK}
    # Faithfulness: does the explanation of a parsed answer support the label the answer states?
    explained: dict[str, list[tuple[int, str]]] = {}
    for i, r in enumerate(rows):
        if r["parsed"] and r["task"] in labelers:
            text = explanation_part(tasks[r["task"]], r["output"])
            if text:
                explained.setdefault(r["task"], []).append((i, text))
    for name, items in explained.items():
        for (i, _), labels in zip(items, labelers[name].predict([t for _, t in items])):
            # consistent: the explanation alone leads to the labels the answer states
            out[i] = {**out[i], "explanation_labels": labels, "consistent": labels == rows[i]["pred_labels"]}
    metrics: dict[str, dict] = {}
    for name, task in tasks.items():
        mine = [r for r in out if r["task"] == name]
        if not mine or name not in labelers:
            continue
        metric = TaskMetrics(task, sync_on_compute=False)
        preds = [r.get("fallback_labels", r["pred_labels"]) for r in mine]
        parsed = [r["labelled_by"] != "none" for r in mine]
        metric.update(preds, [list(r["gold_labels"]) for r in mine], parsed, [r.get("aspect") or "" for r in mine])
        rate = sum(r["labelled_by"] == FALLBACK for r in mine) / len(mine)
        read = [r for r in mine if "explanation_labels" in r]
        consistent = sum(r["explanation_labels"] == r["pred_labels"] for r in read)
        for key, values in metric.compute().items():
            metrics[key] = {
                k: values[k] for k in ("precision", "recall", "f1", "parse_rate", "accuracy") if k in values
            }
            metrics[key]["fallback_rate"] = rate
            metrics[key]["empty_answers"] = empty.get(name, 0)  # unreadable and without any text to classify
            metrics[key]["consistency"] = consistent / len(read) if read else None
            metrics[key]["consistency_n"] = len(read)
    return out, metrics


def fallback_markdown(rule: Mapping[str, dict], fallback: Mapping[str, dict], names: Mapping[str, str]) -> list[str]:
    lines = [
        "## Label fallback (an answer the parser cannot read, labelled from its explanation by the classifier)",
        "",
        "Consistency: of the answers the rules read that carry an explanation, the share whose stated label is the "
        "classifier's reading of that explanation.",
        "",
        "Unlabelled: answers neither the rules nor the classifier labelled (empty answers among them, in brackets: "
        "there is no text to classify).",
        "",
        "| Task | F1, rules only | F1, with fallback | Labelled by the classifier | Unlabelled | Consistency |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, m in fallback.items():
        if key in rule:
            unlabelled = 1 - m["parse_rate"]
            lines.append(
                f"| {names.get(key, key)} | {100 * rule[key]['f1']:.2f} | {100 * m['f1']:.2f} | "
                f"{100 * m['fallback_rate']:.2f}% | {100 * unlabelled:.2f}% ({m.get('empty_answers', 0)} empty) | "
                + (f"{100 * m['consistency']:.2f}% (n {m['consistency_n']})" if m["consistency"] is not None else "-")
                + " |"
            )
    return [*lines, ""]
