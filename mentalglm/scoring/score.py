"""The one scoring path: parse every answer and compute every task's metrics.

In-loop validation and test, resumed evaluations and offline `evaluate.py predictions=FILE` all call `score`.

A row to score holds:
    task         a task name
    output       the generated text
    gold_labels  the gold label list
    aspect       optional, the aspect an aspect task asks about
    parser       optional, strict | free: how to read `output` (a free-form answer: free)
    truncated    optional, true when the token cap cut the answer: unless its label sentence ended (the explanation
                 marker follows it), it is not read as an answer
Other fields (id, index, query, ...) are carried through. Rows of a predictions file give the gold as
`labels` (a list) or `reference` (the gold answer text, parsed with the same parser); `read_predictions`
turns them into rows to score.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from mentalglm.errors import PredictionsError
from mentalglm.scoring.metrics import TaskMetrics
from mentalglm.scoring.parsing import MODES, ParseResult, explanation_part, parse_labels
from mentalglm.tasks import SINGLE_LABEL_KINDS, TASKS, Task

__all__ = ["PredictionsError", "score", "score_records", "read_predictions", "prediction_row", "in_order_of_rows"]


def score(
    rows: Iterable[dict], tasks: Mapping[str, Task], parser_mode: str | None = None
) -> tuple[list[dict], dict[str, dict]]:
    """(rows with `pred_labels`, `parsed` and `parser` added, {metric key: metrics} in the order of `tasks`).
    `parser_mode` (strict | free) reads every row; None: a row's own `parser` field, else strict."""
    scored: list[dict] = []
    batches: dict[str, dict[str, list]] = {}
    cut: dict[str, int] = {}
    read_by: dict[str, dict[str, int]] = {}  # task -> {rule or "unparsed: reason": answers}
    for row in rows:
        task = tasks[row["task"]]
        mode = parser_mode or row.get("parser") or "strict"
        pred = parse_labels(task, row["output"], mode)
        if row.get("truncated"):
            cut[task.name] = cut.get(task.name, 0) + 1
            if pred.parsed and not label_sentence_ended(task, row["output"]):
                pred = ParseResult([], False, reason=CUT_IN_LABEL)
        read = {"labelled_by": pred.rule} if pred.parsed else {"labelled_by": "none", "reason": pred.reason}
        scored.append({**row, "pred_labels": pred.labels, "parsed": pred.parsed, "parser": mode, **read})
        counts = read_by.setdefault(task.name, {})
        how = pred.rule if pred.parsed else f"unparsed: {pred.reason}"
        counts[how] = counts.get(how, 0) + 1
        batch = batches.setdefault(task.name, {"pred": [], "gold": [], "parsed": [], "aspect": []})
        batch["pred"].append(pred.labels)
        batch["gold"].append(list(row["gold_labels"]))
        batch["parsed"].append(pred.parsed)
        batch["aspect"].append(row.get("aspect") or "")
    metrics: dict[str, dict] = {}
    for name, task in tasks.items():
        if name in batches:
            b = batches[name]
            metric = TaskMetrics(task, sync_on_compute=False)  # rows are gathered already: no cross-rank sum
            metric.update(b["pred"], b["gold"], b["parsed"], b["aspect"])
            extra = {"truncated": cut.get(name, 0), "read_by": dict(sorted(read_by[name].items()))}
            metrics.update({k: {**m, **extra} for k, m in metric.compute().items()})
    return scored, metrics


CUT_IN_LABEL = "cut by the token cap inside its label sentence"


def label_sentence_ended(task: Task, output: str) -> bool:
    """The answer went past its label sentence: the explanation marker (any of the task's) follows it."""
    return bool(explanation_part(task, output)) or task.explanation_marker.strip() in output


def in_order_of_rows(rows: list[dict], tasks: Mapping[str, Task]) -> dict[str, Task]:
    """The tasks rows name, in the order they first appear (a predictions file's own order)."""
    return {name: tasks[name] for name in dict.fromkeys(r["task"] for r in rows)}


def score_records(rows: Iterable[dict], tasks: Mapping[str, Task] | None = None, source: str = "rows"):
    """Score in-memory rows in the predictions-file form (gold as `labels` or `reference`); `tasks` they may
    name default to the built-in tasks."""
    registry = TASKS if tasks is None else tasks
    checked = [prediction_row(row, f"{source}: row {i}", registry) for i, row in enumerate(rows, 1)]
    return score(checked, in_order_of_rows(checked, registry))


def _kind(value) -> str:
    return "nothing" if value is None else type(value).__name__


def prediction_row(row, where: str, tasks: Mapping[str, Task]) -> dict:
    """A predictions-file row checked and turned into a row to score (the message of every error names `where`
    and the field)."""
    if not isinstance(row, dict):
        raise PredictionsError(f"{where}: expected a JSON object, got {_kind(row)}")
    name = row.get("task")
    if name is None:
        raise PredictionsError(f"{where}: missing field 'task'")
    if name not in tasks:
        raise PredictionsError(f"{where}: field 'task': unknown task {name!r}; known tasks: {', '.join(tasks)}")
    task = tasks[name]
    gold = _row_gold(task, row, where)
    output = row.get("output")
    if not isinstance(output, str):
        raise PredictionsError(f"{where}: field 'output' must be a string, got {_kind(output)}")
    aspect = row.get("aspect") or ""
    if aspect and aspect not in task.aspects:
        raise PredictionsError(f"{where}: field 'aspect': {aspect!r} is not an aspect of task {task.name}")
    parser = row.get("parser")
    if parser is not None and parser not in MODES:
        raise PredictionsError(f"{where}: field 'parser': {parser!r} is not one of {', '.join(MODES)}")
    return {**row, "gold_labels": gold, "aspect": aspect}


def _row_gold(task: Task, row: dict, where: str) -> list[str]:
    labels = row.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise PredictionsError(f"{where}: field 'labels' must be a list of label names, got {labels!r}")
        unknown = [x for x in labels if x not in task.label_order]
        if unknown:
            raise PredictionsError(
                f"{where}: field 'labels': {unknown[0]!r} is not in task {task.name}'s label set {list(task.labels)}"
            )
        if task.kind in SINGLE_LABEL_KINDS and len(set(labels)) != 1:
            raise PredictionsError(
                f"{where}: field 'labels': task {task.name} takes exactly one gold label, got {labels}"
            )
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


def read_predictions(path: str | Path, tasks: Mapping[str, Task], on_duplicate: str = "error") -> Iterator[dict]:
    """Rows to score from a predictions JSONL file (UTF-8 with or without BOM, GBK or UTF-16; any line ends;
    blank lines skipped; errors name file:line and field). A repeated (task, id, aspect) is an error, or with
    `on_duplicate="keep_first"` the later rows are left out and counted in the log."""
    import logging

    from mentalglm.data.io import DataError, json_lines, read_text

    if on_duplicate not in ("error", "keep_first"):
        raise PredictionsError(f"on_duplicate must be error or keep_first, got {on_duplicate!r}")
    path = Path(path)
    try:
        text = read_text(path, newlines=False)
    except DataError as e:
        raise PredictionsError(str(e)) from None
    seen: dict[tuple, int] = {}
    dropped = 0
    for lineno, row in json_lines(path, text, PredictionsError):
        checked = prediction_row(row, f"{path}:{lineno}", tasks)
        if checked.get("id") not in (None, ""):
            key = (checked["task"], str(checked["id"]), checked["aspect"])
            if key in seen:
                if on_duplicate == "error":
                    raise PredictionsError(
                        f"{path}:{lineno}: field 'id': {key[1]!r} of task {key[0]} repeats line "
                        f"{seen[key]} (each item is scored once; on_duplicate=keep_first keeps "
                        "the first)"
                    )
                dropped += 1
                continue
            seen[key] = lineno
        yield checked
    if dropped:
        logging.getLogger(__name__).warning("%s: %d repeated rows left out (on_duplicate=keep_first)", path, dropped)
