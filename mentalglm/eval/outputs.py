"""Write an evaluation's files (predictions.jsonl, metrics.json, results.md, plots) and log them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mentalglm.eval.atomic import write_atomic, write_json_atomic
from mentalglm.eval.metrics import mean_f1
from mentalglm.eval.report import results_markdown, save_plots

log = logging.getLogger(__name__)

PREDICTION_FIELDS = ("task", "id", "aspect", "output", "gold_labels", "pred_labels", "parsed")


def write_evaluation(predictions: list[dict], results: dict, out_dir: Path, *, log_text: bool = False,
                     loggers=(), title: str = "Test results", baseline: dict | None = None) -> dict:
    """Returns metrics.json's content: {metric key: {...}, "f1_mean": float, "majority_baseline": {key: f1}}.

    `baseline` (metric key -> metrics of the majority-class answer) adds a column to results.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(predictions, key=lambda r: (r["task"], r.get("index", 0)))
    lines = "".join(json.dumps({k: r[k] for k in PREDICTION_FIELDS if k in r} | _inputs(r), ensure_ascii=False) + "\n"
                    for r in rows)
    write_atomic(out_dir / "predictions.jsonl", lines)
    metrics = {**results, "f1_mean": mean_f1(results) if results else None}
    baseline_f1 = {k: v["f1"] for k, v in (baseline or {}).items() if k in results}
    if baseline_f1:
        metrics["majority_baseline"] = {**baseline_f1, "f1_mean": sum(baseline_f1.values()) / len(baseline_f1)}
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_atomic(out_dir / "results.md", results_markdown(results, title=title, baseline=baseline_f1))
    plots = save_plots(results, out_dir)
    _log(metrics, plots, rows, loggers, log_text)
    log.info("wrote %d predictions and metrics to %s (f1_mean %s)", len(rows), out_dir, metrics["f1_mean"])
    return metrics


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
            run.summary.update({f"test/{k}/{m}": v for k, vals in metrics.items() if isinstance(vals, dict)
                                for m, v in vals.items() if isinstance(v, (int, float))})
            run.log({f"test/plots/{p.stem}": wandb.Image(str(p)) for p in plots})
            if log_text:
                # Model outputs and labels only: the prompt (the post) never goes to W&B.
                table = wandb.Table(columns=["task", "id", "output", "gold", "pred"])
                for r in rows[:50]:
                    table.add_data(r["task"], str(r["id"]), r["output"], "、".join(r["gold_labels"]),
                                   "、".join(r["pred_labels"]))
                run.log({"test/samples": table})
        except Exception as e:  # logging must never lose the evaluation itself
            log.warning("could not log evaluation to W&B: %s", e)
