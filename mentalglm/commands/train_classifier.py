"""What train_classifier.py runs: an explanation -> label (or post -> label) classifier per task.

input=explanation (default) trains on the explanations of the train split's gold answers, the label sentence
removed: the consistency classifier of the paper's Appendix C, and what `evaluate.py label_fallback=PATH` uses
for answers the parser cannot read. input=post trains a post -> label baseline (Table 4's BERT rows).
classifier=tfidf needs no pretrained weights (mentalglm/scoring/fallback.py); an encoder classifier fine-tunes
a BERT-family model with Lightning (mentalglm/scoring/encoder.py). Validation, test and, given
expert_examples=..., the expert-example set ("expert") are scored with the project's metrics; classifier.json
(with encoders/ beside it), metrics.json and results.md go to the run directory.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from mentalglm.errors import ConfigError
from mentalglm.fileio.atomic import dumps_json, replace_dir_atomic, write_files_atomic
from mentalglm.reporting.results import display_names, results_markdown
from mentalglm.runtime.builders import build_loggers, build_tasks, build_trainer, load_splits, selected_tasks
from mentalglm.runtime.run_card import data_source
from mentalglm.scoring.fallback import ENCODERS_DIR, TfidfLabeler, labelers_json
from mentalglm.scoring.metrics import TaskMetrics, majority_baseline, result_keys
from mentalglm.tasks import TASKS, Task
from mentalglm.tracking import finish_loggers

log = logging.getLogger(__name__)

KINDS = ("tfidf", "encoder")
INPUTS = ("explanation", "post")
SCORED_SPLITS = ("val", "test", "expert")


def classifier_text(task: Task, record: dict, source: str) -> str:
    """What the classifier reads: the explanation of the answer, or the post (an aspect task's aspect first, since
    one post is asked about several aspects)."""
    from mentalglm.data.splits import post_of
    from mentalglm.scoring.parsing import explanation_part

    if source == "explanation":
        return explanation_part(task, record["answer"])
    aspect = record.get("aspect") or ""
    return f"{aspect}: {post_of(record)}" if aspect else post_of(record)


def classifier_items(task: Task, rows: list[dict], source: str) -> tuple[list[tuple[str, list[str], str]], int]:
    """(text, labels, aspect) of the rows that have a text, and how many had none."""
    items = [(classifier_text(task, r, source), list(r["labels"]), r.get("aspect") or "") for r in rows]
    kept = [it for it in items if it[0].strip()]
    return kept, len(items) - len(kept)


def _expert_rows(cfg: DictConfig, names: list[str], tasks: dict[str, Task]) -> dict[str, list[dict]]:
    from mentalglm.teacher.prompts import read_examples

    examples = cfg.examples or {}
    return {n: read_examples(tasks[n], examples[n]) for n in names if examples.get(n)}


def _encoder_path(cfg: DictConfig) -> str:
    clf = cfg.classifier
    if clf.tiny is not None:
        from mentalglm.models.tiny_bert import ensure_tiny_bert

        return str(ensure_tiny_bert(Path(cfg.paths.cache_dir), **dict(clf.tiny)))
    if not clf.pretrained:
        raise ConfigError("classifier.pretrained is empty: set a hub id (e.g. zwzzz/Chinese-MentalBERT) or a path")
    return str(clf.pretrained)


def _fit_encoder(cfg: DictConfig, task: Task, train, val, out: Path, pretrained: str, loggers: list):
    from mentalglm.scoring.encoder import fit_encoder

    clf = cfg.classifier

    def trainer(callbacks, epochs):  # no best-epoch callback (no validation split): no checkpoint at all
        return build_trainer(cfg, loggers, callbacks, epochs, enable_checkpointing=bool(callbacks))

    labeler, info = fit_encoder(
        task,
        train,
        val,
        pretrained=pretrained,
        trainer_factory=trainer,
        checkpoint_dir=out / ".checkpoints" / task.name,
        epochs=int(clf.epochs),
        batch_size=int(clf.batch_size),
        lr=float(clf.lr),
        weight_decay=float(clf.weight_decay),
        max_length=int(clf.max_length),
        threshold=float(clf.threshold),
        seed=int(cfg.seed),
        trust_remote_code=bool(clf.trust_remote_code),
    )
    return labeler, info


def score_classifier(
    task: Task, labeler, rows: dict[str, list[dict]], train_labels: list[list[str]], source: str
) -> tuple[dict[str, dict], dict[str, dict]]:
    """({split: the project's metrics of the classifier}, {split: {key: majority-class F1}}) for the validation,
    test and expert-example rows (the expert set gets no majority floor)."""
    scored, floor = {}, {}
    for split in SCORED_SPLITS:
        items, missing = classifier_items(task, rows[split], source)
        if missing:
            log.warning("%s %s: %d items have no %s and are left out", task.name, split, missing, source)
        if not items:
            continue
        gold = [y for _, y, _ in items]
        metric = TaskMetrics(task, sync_on_compute=False)
        metric.update(labeler.predict([t for t, _, _ in items]), gold, [True] * len(items), [a for _, _, a in items])
        scored[split] = metric.compute()
        if split != "expert":
            majority = majority_baseline(task, [{"labels": y} for y in train_labels], [{"labels": y} for y in gold])
            floor[split] = {k: m["f1"] for k, m in majority.items()}
    return scored, floor


def table_s1_markdown(metrics: dict[str, dict], tasks: dict[str, Task], split: str = "test") -> list[str]:
    """The paper's Table S1 shape: F1 / P / R (%) of the classifier on the test split (`split`: val where the data
    has no test split) and on the expert examples."""
    names = display_names(tasks)
    keys = result_keys(metrics.get(split, {}) | metrics.get("expert", {}))
    title = "the test split" if split == "test" else f"the {split} split (the data has no test split)"
    lines = [f"## Classifier F1 / P / R (%) on {title} and on the expert examples (Table S1)", ""]
    lines += [f"| Task | {split.capitalize()} | Expert examples |", "|---|---:|---:|"]

    def cell(part: str, key: str) -> str:
        m = metrics.get(part, {}).get(key)
        return f"{100 * m['f1']:.2f} / {100 * m['precision']:.2f} / {100 * m['recall']:.2f} (n {m['n']})" if m else "-"

    lines += [f"| {names.get(k, k)} | {cell(split, k)} | {cell('expert', k)} |" for k in keys]
    return [*lines, ""]


def train_classifier(cfg: DictConfig) -> dict:
    kind = cfg.classifier.kind
    if kind not in KINDS:
        raise ConfigError(f"classifier.kind={kind!r} is not one of {', '.join(KINDS)}")
    if cfg.input not in INPUTS:
        raise ConfigError(f"input={cfg.input!r} is not one of {', '.join(INPUTS)}")
    tasks = build_tasks(cfg)
    names = selected_tasks(cfg, tasks)
    splits = load_splits(cfg, tasks, names)
    unknown = sorted(set(cfg.examples or {}) - set(tasks) - set(TASKS))  # an expert_examples file covers more tasks
    if unknown:
        raise ConfigError(f"examples name tasks that do not exist: {', '.join(unknown)}")
    expert = _expert_rows(cfg, names, tasks)
    pretrained = _encoder_path(cfg) if kind == "encoder" else None
    out = Path(cfg.output_dir)
    labelers, metrics, skipped, baseline, training = {}, {}, {}, {}, {}
    for name in names:
        task = tasks[name]
        rows = {s: [r for r in splits.get(s, []) if r["task"] == name] for s in ("train", "val", "test")}
        rows["expert"] = expert.get(name, [])
        train, skipped[name] = classifier_items(task, rows["train"], cfg.input)
        if skipped[name]:
            log.warning("%s: %d train items have no %s and are left out", name, skipped[name], cfg.input)
        if not train:
            raise ConfigError(f"task {name}: no train item has an {cfg.input} (answers without `推理：`?)")
        if kind == "tfidf":
            labeler = TfidfLabeler.fit(
                task, [t for t, _, _ in train], [y for _, y, _ in train], c=float(cfg.classifier.c)
            )
            scored, floor = score_classifier(task, labeler, rows, [y for _, y, _ in train], cfg.input)
        else:
            loggers = build_loggers(cfg, f"{cfg.experiment_name}-{name}", out, job_type="classifier")
            try:
                val, _ = classifier_items(task, rows["val"], cfg.input)
                labeler, training[name] = _fit_encoder(cfg, task, train, val, out, pretrained, loggers)
                scored, floor = score_classifier(task, labeler, rows, [y for _, y, _ in train], cfg.input)
                final = {
                    f"{s}/{k}/{m}": v[m]
                    for s, r in scored.items()
                    for k, v in r.items()
                    for m in ("precision", "recall", "f1")
                }
                for lg in loggers:  # the final scores beside the per-epoch validation F1
                    lg.log_metrics(final)
            finally:
                finish_loggers(loggers)
        labelers[name] = labeler
        for split, results in scored.items():
            metrics.setdefault(split, {}).update(results)
        for split, f1 in floor.items():
            baseline.setdefault(split, {}).update(f1)
    shutil.rmtree(out / ".checkpoints", ignore_errors=True)
    meta = {"kind": kind, "classifier": cfg.classifier.name, "input": cfg.input, "skipped": skipped}
    meta["data"] = data_source(cfg, names, "test")
    if kind == "encoder":
        meta.update(pretrained=pretrained, training=training)
        meta["settings"] = {k: cfg.classifier[k] for k in ("epochs", "batch_size", "lr", "max_length", "threshold")}

        def save_encoders(tmp: Path) -> None:  # tmp becomes out/ENCODERS_DIR: each at the path encoder_dir() names
            for n, lab in labelers.items():
                lab.save(tmp / n)

        replace_dir_atomic(out / ENCODERS_DIR, save_encoders)
    files = {out / "classifier.json": labelers_json(labelers, meta), out / "metrics.json": dumps_json(metrics)}
    what = f"Classifier ({cfg.classifier.name}, {cfg.input} -> label)"
    for split, results in metrics.items():
        files[out / f"results_{split}.md"] = results_markdown(
            results, tasks, title=f"{what} on {split}", baseline=baseline.get(split)
        )
    main = "test" if "test" in metrics else "val"
    if main in metrics:
        text = results_markdown(metrics[main], tasks, title=f"{what} on {main}", baseline=baseline.get(main))
        if "expert" in metrics:
            text = text.rstrip("\n") + "\n\n" + "\n".join(table_s1_markdown(metrics, tasks, main))
        files[out / "results.md"] = text
    write_files_atomic(files)
    for split, results in metrics.items():
        for key, m in results.items():
            log.info("%s %s: F1 %.2f (n %d)", split, key, 100 * m["f1"], m["n"])
    log.info("wrote %s", out / "classifier.json")
    return metrics
