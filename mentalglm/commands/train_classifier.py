"""What train_classifier.py runs: an explanation -> label (or post -> label) classifier per task.

input=explanation (default) trains on the explanations of the train split's gold answers, the label sentence
removed: the consistency classifier of the paper's Appendix C, and what `evaluate.py label_fallback=PATH` uses
for answers the parser cannot read. input=post trains a post -> label baseline. kind=tfidf needs no
pretrained weights (mentalglm/scoring/fallback.py). Validation and test splits, where the data has them, are
scored with the project's metrics; classifier.json, metrics.json and results.md go to the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from mentalglm.errors import ConfigError
from mentalglm.fileio.atomic import dumps_json, write_files_atomic
from mentalglm.reporting.results import results_markdown
from mentalglm.runtime.builders import build_tasks, load_splits, selected_tasks
from mentalglm.scoring.fallback import TfidfLabeler, labelers_json
from mentalglm.scoring.metrics import TaskMetrics
from mentalglm.tasks import Task

log = logging.getLogger(__name__)

KINDS = ("tfidf",)
INPUTS = ("explanation", "post")


def classifier_text(task: Task, record: dict, source: str) -> str:
    from mentalglm.data.splits import post_of
    from mentalglm.scoring.parsing import explanation_part

    return explanation_part(task, record["answer"]) if source == "explanation" else post_of(record)


def train_classifier(cfg: DictConfig) -> dict:
    if cfg.kind not in KINDS:
        raise ConfigError(f"kind={cfg.kind!r} is not one of {', '.join(KINDS)} (the encoder trainer is not built yet)")
    if cfg.input not in INPUTS:
        raise ConfigError(f"input={cfg.input!r} is not one of {', '.join(INPUTS)}")
    tasks = build_tasks(cfg)
    names = selected_tasks(cfg, tasks)
    splits = load_splits(cfg, tasks, names)
    labelers, metrics, skipped = {}, {}, {}
    for name in names:
        task = tasks[name]
        train = [r for r in splits["train"] if r["task"] == name]
        pairs = [(classifier_text(task, r, cfg.input), r["labels"]) for r in train]
        kept = [(t, y) for t, y in pairs if t.strip()]
        skipped[name] = len(pairs) - len(kept)
        if skipped[name]:
            log.warning("%s: %d train items have no %s and are left out", name, skipped[name], cfg.input)
        if not kept:
            raise ConfigError(f"task {name}: no train item has an {cfg.input} (answers without `推理：`?)")
        labelers[name] = TfidfLabeler.fit(task, [t for t, _ in kept], [y for _, y in kept], c=float(cfg.c))
        for split in ("val", "test"):
            rows = [r for r in splits[split] if r["task"] == name]
            if not rows:
                continue
            predicted = labelers[name].predict([classifier_text(task, r, cfg.input) for r in rows])
            metric = TaskMetrics(task, sync_on_compute=False)
            aspects = [r.get("aspect") or "" for r in rows]
            metric.update(predicted, [r["labels"] for r in rows], [True] * len(rows), aspects)
            metrics.setdefault(split, {}).update(metric.compute())
    out = Path(cfg.output_dir)
    meta = {"kind": cfg.kind, "input": cfg.input, "c": float(cfg.c), "skipped": skipped}
    files = {out / "classifier.json": labelers_json(labelers, meta), out / "metrics.json": dumps_json(metrics)}
    for split, results in metrics.items():
        title = f"Classifier ({cfg.kind}, {cfg.input} -> label) on {split}"
        files[out / f"results_{split}.md"] = results_markdown(results, tasks, title=title)
    write_files_atomic(files)
    for split, results in metrics.items():
        for key, m in results.items():
            log.info("%s %s: F1 %.2f (n %d)", split, key, 100 * m["f1"], m["n"])
    log.info("wrote %s", out / "classifier.json")
    return metrics
