"""The one writer of an evaluation's files: predictions (or scored rows), metrics.json, results.md and plots,
written as one unit (all of them or, on a full or read-only disk, none), then mirrored to W&B.

metrics.json (schema_version 1):
    "<metric key>": {"precision", "recall", "f1", "parse_rate", "n", "per_label", ...}   one per metric key,
                    in the order of the selected tasks (a hierarchical task has two: <task>_parent, <task>_child)
    "f1_mean":      mean F1 over the metric keys
    "majority_baseline": {"<metric key>": F1, "f1_mean": ...}   always answering the most frequent training labels
    "tasks":        {"<task>": {"display_name", "kind", "metric_keys", "metric_display_names"}}
    "templates":    the data.templates overrides in force when the answers were scored ({} when none)
    "data":         {"name", "answers", "split", "files": {"<task>": file}}: the data scored (when known)
    "scores":       with scores.enabled: {"<task>": {"calibration", "before", "after", "agreement_with_generation",
                    "triage" (binary tasks)}} (mentalglm/scoring/calibration.py); absent otherwise
    "schema_version": 1
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from mentalglm.errors import ConfigError
from mentalglm.fileio.atomic import dumps_json, jsonl_text, write_files_atomic
from mentalglm.reporting.results import display_names, render_plots, results_markdown
from mentalglm.reporting.risk import risk_markdown, risk_plots
from mentalglm.scoring.metrics import mean_f1
from mentalglm.tasks import Task

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PREDICTION_FIELDS = (
    "task",
    "id",
    "aspect",
    "output",
    "gold_labels",
    "pred_labels",
    "parsed",
    "parser",
    "labelled_by",
    "reason",
    "fallback_labels",
    "explanation_labels",
    "consistent",
    "scores",
    "likelihood_labels",
    "calibrated_scores",
)
# Keys of metrics.json beside the metric keys (no task may be named so: mentalglm/tasks.py RESERVED_NAMES).
SUMMARY_KEYS = (
    "f1_mean",
    "majority_baseline",
    "tasks",
    "templates",
    "scores",
    "fallback",
    "explanations",
    "schema_version",
)
# Researchers read the outputs of these models as screening aids; results files say so.
SCREENING_NOTICE = (
    "Research use: model outputs are screening aids for research, not diagnoses; they do not "
    "replace a clinician's judgement."
)


def task_summary(tasks: Mapping[str, Task]) -> dict[str, dict]:
    return {
        name: {
            "display_name": t.display_name,
            "kind": t.kind,
            "metric_keys": list(t.metric_keys),
            "metric_display_names": t.metric_display_names,
        }
        for name, t in tasks.items()
    }


def metrics_document(
    results: dict[str, dict],
    tasks: Mapping[str, Task],
    baseline: dict | None = None,
    templates: Mapping | None = None,
    risk: Mapping[str, dict] | None = None,
    fallback: Mapping[str, dict] | None = None,
    explanations: Mapping[str, dict] | None = None,
    data: Mapping | None = None,
) -> dict:
    """metrics.json's content (see the module docstring)."""
    doc: dict = {**results, "f1_mean": mean_f1(results) if results else None}
    baseline_f1 = {k: v["f1"] for k, v in (baseline or {}).items() if k in results}
    if baseline_f1:
        doc["majority_baseline"] = {**baseline_f1, "f1_mean": sum(baseline_f1.values()) / len(baseline_f1)}
    used = {name: t for name, t in tasks.items() if any(k in results for k in t.metric_keys)}
    doc["tasks"] = task_summary(used)
    doc["templates"] = {k: dict(v) for k, v in (templates or {}).items() if k in used}
    if risk:
        doc["scores"] = dict(risk)
    if fallback:
        doc["fallback"] = dict(fallback)
    if explanations:
        doc["explanations"] = dict(explanations)
    if data:
        doc["data"] = dict(data)
    doc["schema_version"] = SCHEMA_VERSION
    return doc


def write_evaluation(
    rows: list[dict],
    results: dict,
    out_dir: Path,
    tasks: Mapping[str, Task],
    *,
    title: str = "Test results",
    baseline: dict | None = None,
    templates: Mapping | None = None,
    rows_file: str = "predictions.jsonl",
    fields: tuple[str, ...] | None = PREDICTION_FIELDS,
    plots: bool = True,
    log_text: bool = False,
    loggers=(),
    risk: Mapping[str, dict] | None = None,
    calibrations: Mapping | None = None,
    bins: int = 15,
    fallback: Mapping[str, dict] | None = None,
    explanations: Mapping[str, dict] | None = None,
    data: Mapping | None = None,
) -> dict:
    """Write the files of one evaluation and return metrics.json's content.

        `rows`: scored rows (`scoring.score`), written to `rows_file` sorted by task and position (`fields`: which
        fields, None = all; the prompt only when a row carries it, i.e. with save_inputs=true). `baseline`: metric
        key -> metrics of the majority-class answer (a column in results.md). `risk`: the risk-score report per task
    (`scoring.calibration.calibrate_rows`), with `calibrations` written to calibration.json for predict/serve."""
    out_dir = Path(out_dir)
    order = {name: i for i, name in enumerate(tasks)}
    ordered = sorted(rows, key=lambda r: (order.get(r["task"], len(order)), r.get("index", 0)))
    keep = (lambda r: {k: r[k] for k in fields if k in r} | _inputs(r)) if fields else dict
    doc = metrics_document(results, tasks, baseline, templates, risk, fallback, explanations, data)
    markdown = results_markdown(
        results, tasks, title=title, notice=SCREENING_NOTICE, baseline=doc.get("majority_baseline")
    )
    sections = []
    if risk:
        sections.append(risk_markdown(risk, tasks))
    if fallback:
        from mentalglm.scoring.fallback import fallback_markdown

        rule = {k: v for k, v in results.items() if k in fallback}
        sections.append(fallback_markdown(rule, fallback, display_names(tasks)))
    if explanations:
        from mentalglm.scoring.text_metrics import explanation_markdown

        sections.append(explanation_markdown(explanations, display_names(tasks)))
    for lines in sections:
        markdown = markdown.rstrip("\n") + "\n\n" + "\n".join(lines)
    files: dict[Path, str | bytes] = {
        out_dir / rows_file: jsonl_text(keep(r) for r in ordered),
        out_dir / "metrics.json": dumps_json(doc),
        out_dir / "results.md": markdown,
    }
    if calibrations:
        files[out_dir / "calibration.json"] = dumps_json(
            {"tasks": {name: cal.to_dict() for name, cal in calibrations.items()}}
        )
    pngs = render_plots(results, out_dir, tasks) if plots else {}
    if plots and risk:
        pngs |= risk_plots(ordered, tasks, out_dir, bins)
    write_files_atomic({**files, **pngs})
    _log(doc, list(pngs), ordered, loggers, log_text)
    log.info("wrote %d predictions and metrics to %s (f1_mean %s)", len(ordered), out_dir, doc["f1_mean"])
    return doc


def with_fallback(rows: list[dict], tasks: Mapping[str, Task], path: str) -> tuple[list[dict], dict]:
    """Rows and with-fallback metrics of `label_fallback=path` (mentalglm/scoring/fallback.py)."""
    from mentalglm.scoring.fallback import label_fallback, load_labelers

    labelers = load_labelers(path, tasks)
    if not labelers:
        raise ConfigError(f"label_fallback={path} has a classifier for none of {', '.join(tasks)}")
    uncovered = [n for n in tasks if n not in labelers]
    if uncovered:
        log.warning(
            "label_fallback=%s has no classifier for %s: their unreadable answers stay unlabelled",
            path,
            ", ".join(uncovered),
        )
    rows, metrics = label_fallback(rows, tasks, labelers)
    return rows, {**metrics, "classifier": str(path)}


def _inputs(row: dict) -> dict:
    # Raw post text is written only when the user asked for it (save_inputs=true).
    return {"query": row["query"]} if "query" in row else {}


def _log(metrics: dict, plots: list[Path], rows: list[dict], loggers, log_text: bool) -> None:
    for lg in loggers or ():
        if lg.__class__.__name__ != "WandbLogger":
            continue
        try:
            import wandb

            run = lg.experiment
            run.summary.update(
                {
                    f"test/{k}/{m}": v
                    for k, vals in metrics.items()
                    if isinstance(vals, dict) and k not in SUMMARY_KEYS
                    for m, v in vals.items()
                    if isinstance(v, (int, float))
                }
            )
            run.summary.update(_flat("test/scores", metrics.get("scores") or {}))
            run.summary.update(_flat("test/fallback", metrics.get("fallback") or {}))
            run.summary.update(_flat("test/explanations", metrics.get("explanations") or {}))
            run.log({f"test/plots/{p.stem}": wandb.Image(str(p)) for p in plots})
            if log_text:
                # Model outputs and labels only: the prompt (the post) never goes to W&B.
                table = wandb.Table(columns=["task", "id", "output", "gold", "pred"])
                for r in rows[:50]:
                    table.add_data(
                        r["task"], str(r["id"]), r["output"], "、".join(r["gold_labels"]), "、".join(r["pred_labels"])
                    )
                run.log({"test/samples": table})
        except Exception as e:  # logging must never lose the evaluation itself
            log.warning("could not log evaluation to W&B: %s", e)


def _flat(prefix: str, tree: Mapping) -> dict[str, float]:
    """Numbers of a nested dict under slash-joined keys (test/scores/sos_hl_1k/after/ece)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= _flat(f"{prefix}/{key}", value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out


def score_predictions_file(
    path: str | Path,
    out_dir: str | Path,
    tasks: Mapping[str, Task] | None = None,
    *,
    templates: Mapping | None = None,
    plots: bool = False,
    on_duplicate: str = "error",
    title: str | None = None,
    parser_mode: str | None = None,
    label_fallback: str | None = None,
    explanation_tokenizer: str = "char",
    bertscore=None,
) -> dict:
    """Score a predictions JSONL file (rows may name any of `tasks`, default the built-in tasks): metrics.json,
    scored.jsonl (every row with its parse) and results.md, in the order the file names its tasks."""
    from mentalglm.errors import PredictionsError
    from mentalglm.scoring.score import in_order_of_rows, read_predictions, score
    from mentalglm.tasks import TASKS

    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"predictions={path} is not a file")
    registry = TASKS if tasks is None else tasks
    checked = list(read_predictions(path, registry, on_duplicate))
    if not checked:
        raise PredictionsError(f"{path}: no predictions in the file (nothing to score)")
    used = in_order_of_rows(checked, registry)
    rows, results = score(checked, used, parser_mode)
    fallback = None
    if label_fallback:
        rows, fallback = with_fallback(rows, used, label_fallback)
    from mentalglm.scoring.text_metrics import explanation_report

    return write_evaluation(
        rows,
        results,
        Path(out_dir),
        used,
        fallback=fallback,
        explanations=explanation_report(rows, used, explanation_tokenizer, bertscore=bertscore),
        title=title or f"Results: {path.name}",
        fields=None,
        plots=plots,
        rows_file="scored.jsonl",
        templates=templates,
    )
