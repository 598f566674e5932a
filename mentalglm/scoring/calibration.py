"""Calibrated risk scores: temperature (or Platt) scaling fitted on validation, probability metrics, triage.

Rows carry `scores` ({label: probability}, runtime/likelihood.py) and `gold_labels`. Per task:
- single-label tasks: a distribution over the labels. Temperature scaling divides the log-probabilities by T
  (the argmax never changes); Platt scaling (binary tasks) fits sigmoid(a z + b) on z = log p+ - log p-.
  ECE is the top-label calibration error (15 equal-width bins), Brier and NLL are those of scikit-learn
  (`brier_score_loss`, `log_loss`), AUROC/AUPRC rank the positive class (binary) or are one-vs-rest macro means.
- multi-label and hierarchical tasks: one yes/no decision per (item, label); both methods act on the logit of
  each probability; ECE, Brier and NLL are over all decisions; AUROC/AUPRC are macro means over the labels
  that occur and are absent at least once.
Binary tasks also get a triage threshold: the highest one that reaches the configured sensitivity on
validation, with its sensitivity, specificity and precision on test, and precision@k of the test ranking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_calibration_error,
    multiclass_auroc,
    multiclass_average_precision,
    multiclass_calibration_error,
)

from mentalglm.errors import ConfigError
from mentalglm.tasks import SINGLE_LABEL_KINDS, Task

METHODS = ("temperature", "platt", "none")
EPS = 1e-12


# ----------------------------------------------------------------------------- arrays of one task
@dataclass
class TaskScores:
    """A task's scored items as arrays: `probs` [items, labels]; single-label: `target` the gold index per item;
    multi-label: `target` [items, labels] of 0/1."""

    task: Task
    probs: torch.Tensor
    target: torch.Tensor

    @property
    def single(self) -> bool:
        return self.task.kind in SINGLE_LABEL_KINDS


def task_scores(task: Task, rows: Sequence[dict], field: str = "scores") -> TaskScores:
    rows = [r for r in rows if r["task"] == task.name and r.get(field)]
    probs = torch.tensor([[float(r[field][lab]) for lab in task.labels] for r in rows], dtype=torch.float64)
    probs = probs.reshape(len(rows), len(task.labels))
    if task.kind in SINGLE_LABEL_KINDS:
        order = task.label_order
        target = torch.tensor([order[r["gold_labels"][0]] for r in rows], dtype=torch.long)
    else:
        target = torch.tensor(
            [[float(lab in set(r["gold_labels"])) for lab in task.labels] for r in rows], dtype=torch.float64
        ).reshape(len(rows), len(task.labels))
    return TaskScores(task, probs, target)


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(EPS, 1 - EPS)
    return p.log() - (-p).log1p()


# ----------------------------------------------------------------------------- calibrators
@dataclass
class Calibration:
    """A fitted calibration: `temperature` (method temperature) or `a`, `b` (method platt)."""

    method: str = "none"
    temperature: float = 1.0
    a: float = 1.0
    b: float = 0.0
    fitted_on: int = 0  # validation items

    def apply(self, scores: TaskScores) -> TaskScores:
        p = scores.probs
        if self.method == "none" or p.numel() == 0:
            return scores
        if scores.single:
            if self.method == "temperature":
                p = (p.clamp_min(EPS).log() / self.temperature).softmax(-1)
            else:  # platt, binary: the positive column from the fitted sigmoid
                pos = scores.task.label_order[scores.task.positive]
                z = p[:, pos].clamp_min(EPS).log() - p[:, 1 - pos].clamp_min(EPS).log()
                q = torch.sigmoid(self.a * z + self.b)
                p = torch.stack([1 - q, q], dim=1) if pos == 1 else torch.stack([q, 1 - q], dim=1)
        else:
            z = _logit(p)
            p = (
                torch.sigmoid(z / self.temperature)
                if self.method == "temperature"
                else torch.sigmoid(self.a * z + self.b)
            )
        return TaskScores(scores.task, p, scores.target)

    def to_dict(self) -> dict:
        return asdict(self)


def _minimize(loss_fn, params: list[torch.Tensor]) -> None:
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)


def fit_calibration(scores: TaskScores, method: str) -> Calibration:
    """Fit `method` on validation scores by minimising their negative log-likelihood."""
    if method not in METHODS:
        raise ConfigError(f"scores.calibration must be one of {', '.join(METHODS)}, got {method!r}")
    n = len(scores.probs)
    if method == "none" or n == 0:
        return Calibration("none", fitted_on=0)
    if method == "platt" and scores.task.kind == "multiclass":
        raise ConfigError(f"scores.calibration=platt is for yes/no decisions; task {scores.task.name} is multiclass")
    p, y = scores.probs.detach(), scores.target
    if scores.single and method == "temperature":
        logp = p.clamp_min(EPS).log()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        _minimize(lambda: torch.nn.functional.cross_entropy(logp / log_t.exp(), y), [log_t])
        return Calibration("temperature", temperature=float(log_t.detach().exp()), fitted_on=n)
    if scores.single:  # platt on a binary task
        pos = scores.task.label_order[scores.task.positive]
        z = p[:, pos].clamp_min(EPS).log() - p[:, 1 - pos].clamp_min(EPS).log()
        target = (y == pos).double()
    else:
        z, target = _logit(p).flatten(), y.flatten()
    if method == "temperature":
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        _minimize(lambda: torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), target), [log_t])
        return Calibration("temperature", temperature=float(log_t.detach().exp()), fitted_on=n)
    a = torch.ones((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    _minimize(lambda: torch.nn.functional.binary_cross_entropy_with_logits(a * z + b, target), [a, b])
    return Calibration("platt", a=float(a.detach()), b=float(b.detach()), fitted_on=n)


# ----------------------------------------------------------------------------- metrics
def probability_metrics(scores: TaskScores, bins: int = 15) -> dict[str, float | None]:
    """ECE, Brier, NLL, AUROC and AUPRC of one task's probabilities (see the module docstring)."""
    p, y = scores.probs, scores.target
    if len(p) == 0:
        return {"n": 0}
    if scores.single:
        c = p.shape[1]
        pc = p.clamp(EPS, 1)
        out = {
            "ece": float(multiclass_calibration_error(p, y, num_classes=c, n_bins=bins, norm="l1")),
            "nll": float(-pc.log().gather(1, y[:, None]).mean()),
        }
        onehot = torch.nn.functional.one_hot(y, c).double()
        if scores.task.kind == "binary":
            pos = scores.task.label_order[scores.task.positive]
            out["brier"] = float(((p[:, pos] - onehot[:, pos]) ** 2).mean())
            out |= _ranking(p[:, pos], (y == pos).long())
        else:
            out["brier"] = float(((p - onehot) ** 2).sum(1).mean())
            present = len(set(y.tolist())) == c
            out["auroc"] = float(multiclass_auroc(p, y, num_classes=c, average="macro")) if present else None
            out["auprc"] = (
                float(multiclass_average_precision(p, y, num_classes=c, average="macro")) if present else None
            )
        return {"n": len(p), **out}
    flat_p, flat_y = p.flatten(), y.flatten()
    pc = flat_p.clamp(EPS, 1 - EPS)
    out = {
        "ece": float(binary_calibration_error(flat_p, flat_y.long(), n_bins=bins, norm="l1")),
        "brier": float(((flat_p - flat_y) ** 2).mean()),
        "nll": float(-(flat_y * pc.log() + (1 - flat_y) * (-pc).log1p()).mean()),
    }
    per_label = [_ranking(p[:, j], y[:, j].long()) for j in range(p.shape[1])]
    for key in ("auroc", "auprc"):
        values = [m[key] for m in per_label if m[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return {"n": len(p), **out}


def _ranking(p: torch.Tensor, y: torch.Tensor) -> dict[str, float | None]:
    if y.min() == y.max():  # one class only: no ranking to judge
        return {"auroc": None, "auprc": None}
    return {"auroc": float(binary_auroc(p, y)), "auprc": float(binary_average_precision(p, y))}


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> list[dict]:
    """Equal-width bins of confidence: count, mean confidence and accuracy per non-empty bin."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence.double(), edges[1:-1], right=True)
    out = []
    for b in range(bins):
        sel = index == b
        if sel.any():
            out.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "n": int(sel.sum()),
                    "confidence": float(confidence[sel].double().mean()),
                    "accuracy": float(correct[sel].double().mean()),
                }
            )
    return out


def confidence_and_correct(scores: TaskScores) -> tuple[torch.Tensor, torch.Tensor]:
    """What a reliability diagram shows: top-label confidence and correctness (single-label), else each
    decision's probability and whether the label is gold."""
    if scores.single:
        conf, pred = scores.probs.max(1)
        return conf, (pred == scores.target).double()
    return scores.probs.flatten(), scores.target.flatten()


# ----------------------------------------------------------------------------- triage (binary tasks)
def positive_probs(scores: TaskScores) -> tuple[torch.Tensor, torch.Tensor]:
    pos = scores.task.label_order[scores.task.positive]
    return scores.probs[:, pos], (scores.target == pos).long()


def triage(
    val: TaskScores, test: TaskScores, sensitivity: float = 0.9, ks: Sequence[int] = (10, 50, 100)
) -> dict | None:
    """The threshold reaching `sensitivity` on validation, its operating point on test, precision@k on test."""
    vp, vy = positive_probs(val)
    tp_, ty = positive_probs(test)
    if not 0 < sensitivity <= 1:
        raise ConfigError(f"scores.sensitivity must be in (0, 1], got {sensitivity}")
    out: dict = {"target_sensitivity": sensitivity}
    positives = vp[vy == 1].sort(descending=True).values
    if len(positives) and len(tp_):
        k = math.ceil(sensitivity * len(positives))
        threshold = float(positives[k - 1])
        pred = tp_ >= threshold
        tpos, fpos = int((pred & (ty == 1)).sum()), int((pred & (ty == 0)).sum())
        n_pos, n_neg = int((ty == 1).sum()), int((ty == 0).sum())
        out |= {
            "threshold": threshold,
            "val_sensitivity": float((vp[vy == 1] >= threshold).double().mean()),
            "sensitivity": tpos / n_pos if n_pos else None,
            "specificity": int((~pred & (ty == 0)).sum()) / n_neg if n_neg else None,
            "precision": tpos / (tpos + fpos) if tpos + fpos else None,
            "flagged": int(pred.sum()),
        }
    else:
        out["threshold"] = None  # no positive validation item to set it on
    order = torch.argsort(tp_, descending=True, stable=True)
    out["precision_at_k"] = {str(k): float(ty[order[:k]].double().mean()) for k in ks if 0 < k <= len(tp_)}
    return out


# ----------------------------------------------------------------------------- one task, end to end
def agreement(rows: Sequence[dict], task: Task) -> float | None:
    """Share of items whose likelihood labels equal the labels parsed from the generated answer."""
    both = [r for r in rows if r["task"] == task.name and "likelihood_labels" in r and "pred_labels" in r]
    if not both:
        return None
    return sum(sorted(r["likelihood_labels"]) == sorted(r["pred_labels"]) for r in both) / len(both)


def calibrate_rows(
    val_rows: Sequence[dict],
    test_rows: Sequence[dict],
    tasks: Mapping[str, Task],
    *,
    method: str = "temperature",
    sensitivity: float = 0.9,
    ks: Sequence[int] = (10, 50, 100),
    bins: int = 15,
) -> tuple[list[dict], dict[str, dict], dict[str, Calibration]]:
    """Fit per task on `val_rows`, apply to `test_rows`: (test rows with `calibrated_scores`, report per task,
    calibration per task)."""
    report: dict[str, dict] = {}
    calibrations: dict[str, Calibration] = {}
    calibrated: dict[tuple[str, str, str], dict[str, float]] = {}
    for name, task in tasks.items():
        test = task_scores(task, test_rows)
        if len(test.probs) == 0:
            continue
        val = task_scores(task, val_rows)
        cal = fit_calibration(val, method) if len(val.probs) else Calibration("none")
        after = cal.apply(test)
        calibrations[name] = cal
        entry: dict = {
            "calibration": cal.to_dict(),
            "before": probability_metrics(test, bins),
            "after": probability_metrics(after, bins),
            "agreement_with_generation": agreement(test_rows, task),
        }
        if task.kind == "binary" and len(val.probs):
            entry["triage"] = triage(cal.apply(val), after, sensitivity, ks)
        report[name] = entry
        items = [r for r in test_rows if r["task"] == name and r.get("scores")]
        for r, p in zip(items, after.probs.tolist()):
            calibrated[(name, str(r["id"]), r.get("aspect") or "")] = dict(zip(task.labels, p))
    out = []
    for r in test_rows:
        key = (r["task"], str(r["id"]), r.get("aspect") or "")
        out.append({**r, "calibrated_scores": calibrated[key]} if key in calibrated else dict(r))
    return out, report, calibrations
