"""Risk scores in results.md and as charts: calibration before/after, triage, reliability diagrams, ROC and PR."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mentalglm.reporting.results import _pct, _png, _slug, _table
from mentalglm.scoring.calibration import (
    confidence_and_correct,
    positive_probs,
    reliability_bins,
    task_scores,
)
from mentalglm.tasks import Task

RISK_NOTICE = (
    "Risk scores rank and calibrate the model's own label likelihoods. They are research screening aids, not "
    "diagnoses: a threshold set on one population's validation data need not hold on another."
)


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def risk_markdown(report: Mapping[str, dict], tasks: Mapping[str, Task]) -> list[str]:
    """The results.md section of the risk scores (empty when there are none)."""
    if not report:
        return []
    lines = ["## Risk scores from label likelihoods", "", RISK_NOTICE, ""]
    lines += [
        "Each label sentence is scored by its likelihood given the prompt; calibration is fitted on the validation "
        "split and applied to test. ECE: 15-bin expected calibration error (top label for single-label tasks, "
        "every label decision for multi-label tasks). Agreement: share of items whose most likely labels equal "
        "the labels parsed from the generated answer.",
        "",
    ]
    rows = []
    for name, entry in report.items():
        cal, before, after = entry["calibration"], entry["before"], entry["after"]
        fit = {"temperature": f"T = {cal['temperature']:.2f}", "platt": f"a = {cal['a']:.2f}, b = {cal['b']:.2f}"}
        rows.append(
            [
                tasks[name].display_name if name in tasks else name,
                f"{cal['method']} ({fit[cal['method']]}, {cal['fitted_on']} val items)"
                if cal["method"] in fit
                else "none",
                f"{_num(before.get('ece'))} -> {_num(after.get('ece'))}",
                f"{_num(before.get('brier'))} -> {_num(after.get('brier'))}",
                f"{_num(before.get('nll'))} -> {_num(after.get('nll'))}",
                _num(after.get("auroc")),
                _num(after.get("auprc")),
                _pct(entry.get("agreement_with_generation")),
                str(after.get("n", 0)),
            ]
        )
    header = ["Task", "Calibration", "ECE", "Brier", "NLL", "AUROC", "AUPRC", "Agreement", "n"]
    lines += _table(header, rows, text_columns=2) + [""]
    triaged = {n: e["triage"] for n, e in report.items() if e.get("triage")}
    if triaged:
        lines += ["### Triage (binary tasks)", ""]
        rows = []
        for name, t in triaged.items():
            at_k = ", ".join(f"@{k}: {_pct(v)}" for k, v in t.get("precision_at_k", {}).items()) or "-"
            rows.append(
                [
                    tasks[name].display_name if name in tasks else name,
                    _pct(t["target_sensitivity"]),
                    _num(t.get("threshold")),
                    _pct(t.get("sensitivity")),
                    _pct(t.get("specificity")),
                    _pct(t.get("precision")),
                    str(t.get("flagged", "-")),
                    at_k,
                ]
            )
        lines += [
            "Threshold: the highest calibrated probability of the positive class that flags the target share of "
            "validation positives; sensitivity, specificity and precision are on test. Precision@k: share of "
            "positives among the k highest-scored test posts.",
            "",
        ]
        lines += _table(
            ["Task", "Target sensitivity", "Threshold", "Sensitivity", "Specificity", "Precision", "Flagged", "P@k"],
            rows,
            text_columns=1,
        ) + [""]
    return lines


def _reliability_chart(title: str, before: list[dict], after: list[dict]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for bins, label, style in ((before, "before", "o-"), (after, "after", "s-")):
        if bins:
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style, label=label, markersize=4)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="observed frequency", title=title)
    ax.legend(loc="upper left")
    return _png(fig)


def _curve_chart(title: str, x: Sequence[float], y: Sequence[float], xlabel: str, ylabel: str, diagonal: bool):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    if diagonal:
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.plot(x, y)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
    return _png(fig)


def risk_plots(rows: Sequence[dict], tasks: Mapping[str, Task], out_dir: Path, bins: int = 15) -> dict[Path, bytes]:
    """reliability_<task>.png per task; roc_<task>.png and pr_<task>.png per binary task (calibrated scores)."""
    from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

    out: dict[Path, bytes] = {}
    for name, task in tasks.items():
        raw = task_scores(task, rows, "scores")
        if len(raw.probs) == 0:
            continue
        cal = task_scores(task, rows, "calibrated_scores")
        cal = cal if len(cal.probs) else raw
        out[Path(out_dir) / f"reliability_{_slug(name)}.png"] = _reliability_chart(
            f"{task.display_name}: reliability",
            reliability_bins(*confidence_and_correct(raw), bins),
            reliability_bins(*confidence_and_correct(cal), bins),
        )
        if task.kind == "binary":
            p, y = positive_probs(cal)
            if y.min() != y.max():
                fpr, tpr, _ = binary_roc(p, y)
                precision, recall, _ = binary_precision_recall_curve(p, y)
                out[Path(out_dir) / f"roc_{_slug(name)}.png"] = _curve_chart(
                    f"{task.display_name}: ROC", fpr.tolist(), tpr.tolist(), "1 - specificity", "sensitivity", True
                )
                out[Path(out_dir) / f"pr_{_slug(name)}.png"] = _curve_chart(
                    f"{task.display_name}: precision-recall",
                    recall.tolist(),
                    precision.tolist(),
                    "recall (sensitivity)",
                    "precision",
                    False,
                )
    return out
