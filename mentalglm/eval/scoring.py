"""Score generated answers: parse predictions (and gold answers) and compute every task's metrics.

Input rows (one JSON object per line in a predictions file):
    task       a key of TASKS
    output     the generated text
    reference  the gold answer text (parsed with the same parser), or
    labels     the gold label list (preferred when both are given)
    aspect     optional, MultiWD/IRF aspect
Other fields (id, query, ...) are carried through to scored.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from mentalglm.eval.atomic import write_atomic, write_json_atomic, write_jsonl_atomic
from mentalglm.eval.metrics import TaskMetrics, ordered_keys
from mentalglm.eval.parsing import SINGLE_LABEL_KINDS, parse_labels
from mentalglm.eval.report import results_markdown, save_plots
from mentalglm.tasks import TASKS, Task


class PredictionsError(ValueError):
    """A bad predictions row; the message names the file (or row source), line and field."""


def score_records(rows: Iterable[dict], source: str = "rows") -> tuple[list[dict], dict[str, dict]]:
    """Parse every row's output and gold; return (scored rows, {metric_key: metrics})."""
    return _score((f"{source}: row {i}", row) for i, row in enumerate(rows, 1))


def _score(located_rows: Iterable[tuple[str, dict]]) -> tuple[list[dict], dict[str, dict]]:
    scored: list[dict] = []
    batches: dict[str, dict[str, list]] = {}
    for where, row in located_rows:
        task = _row_task(row, where)
        gold = _row_gold(task, row, where)
        output = row.get("output")
        if not isinstance(output, str):
            raise PredictionsError(f"{where}: field 'output' must be a string, got {_kind(output)}")
        aspect = row.get("aspect") or ""
        if aspect and aspect not in task.aspects:
            raise PredictionsError(f"{where}: field 'aspect': {aspect!r} is not an aspect of task {task.name}")
        pred = parse_labels(task, output)
        scored.append({**row, "pred_labels": pred.labels, "gold_labels": gold, "parsed": pred.parsed})
        batch = batches.setdefault(task.name, {"pred": [], "gold": [], "parsed": [], "aspect": []})
        batch["pred"].append(pred.labels)
        batch["gold"].append(gold)
        batch["parsed"].append(pred.parsed)
        batch["aspect"].append(aspect)
    metrics: dict[str, dict] = {}
    for name, batch in batches.items():
        metric = TaskMetrics(TASKS[name])
        metric.update(batch["pred"], batch["gold"], batch["parsed"], batch["aspect"])
        metrics.update(metric.compute())
    return scored, {k: metrics[k] for k in ordered_keys(metrics)}


def _kind(value) -> str:
    return "nothing" if value is None else type(value).__name__


def _row_task(row, where: str) -> Task:
    if not isinstance(row, dict):
        raise PredictionsError(f"{where}: expected a JSON object, got {_kind(row)}")
    name = row.get("task")
    if name is None:
        raise PredictionsError(f"{where}: missing field 'task'")
    if name not in TASKS:
        raise PredictionsError(f"{where}: field 'task': unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _row_gold(task: Task, row: dict, where: str) -> list[str]:
    labels = row.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise PredictionsError(f"{where}: field 'labels' must be a list of label names, got {labels!r}")
        unknown = [x for x in labels if x not in task.label_order]
        if unknown:
            raise PredictionsError(f"{where}: field 'labels': {unknown[0]!r} is not in task {task.name}'s label set "
                                   f"{list(task.labels)}")
        if task.kind in SINGLE_LABEL_KINDS and len(set(labels)) != 1:
            raise PredictionsError(f"{where}: field 'labels': task {task.name} takes exactly one gold label, "
                                   f"got {labels}")
        return task.order_labels(labels)
    reference = row.get("reference")
    if reference is None:
        raise PredictionsError(f"{where}: needs field 'labels' or field 'reference' (the gold answer)")
    if not isinstance(reference, str):
        raise PredictionsError(f"{where}: field 'reference' must be a string, got {_kind(reference)}")
    gold = parse_labels(task, reference)
    if not gold.parsed:
        raise PredictionsError(f"{where}: field 'reference': no label of task {task.name} found in the gold answer")
    return gold.labels


def read_predictions(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(location "file:line", row) for every non-blank line of a JSONL file."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PredictionsError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
            yield f"{path}:{lineno}", row


def score_predictions_file(path: str | Path, out_dir: str | Path, title: str | None = None,
                           plots: bool = False) -> dict[str, dict]:
    """Score a predictions JSONL file; write metrics.json, scored.jsonl and results.md into out_dir."""
    scored, metrics = _score(read_predictions(path))
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_jsonl_atomic(out_dir / "scored.jsonl", scored)
    write_atomic(out_dir / "results.md", results_markdown(metrics, title=title or f"Results: {Path(path).name}"))
    if plots:
        save_plots(metrics, out_dir / "plots")
    return metrics
