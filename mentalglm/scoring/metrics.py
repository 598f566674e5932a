"""Task metrics as a torchmetrics `Metric`: sum-reduced count states, so `.to(device)`, `.reset()` and
DDP sync work, and every number is computed exactly from the counts.

What each task reports (fractions in [0, 1]; always precision, recall, f1, parse_rate, n):
- binary (e.g. sos_hl_1k, IMHI yes/no): P/R/F1 of the positive class, plus accuracy and f1_weighted.
- multiclass (e.g. IMHI sad, cams): weighted P/R/F1 (as MentaLLaMA), plus accuracy, f1_weighted.
- multilabel (e.g. socialcd_3k): micro P/R/F1 over the labels.
- hierarchical (e.g. cp): micro P/R/F1 at parent level (`cp_parent`) and child level (`cp_child`).

Unparsed answers are always wrong: single-label tasks give them an extra "unparsed" prediction column
(a miss for the gold class, a hit for none), multi-label tasks an all-zero prediction.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
from torchmetrics import Metric

from mentalglm.scoring.parsing import cp_parent_child_sets
from mentalglm.tasks import SINGLE_LABEL_KINDS, Task

UNPARSED = "unparsed"


def result_keys(results: dict) -> list[str]:
    """Metric keys of a results dict, in its order (the selected tasks' order), skipping summary entries such
    as "f1_mean": 0.6."""
    return [k for k, v in results.items() if isinstance(v, dict) and "f1" in v]


class TaskMetrics(Metric):
    """Accumulates one task's predictions; `compute()` returns {metric_key: {metric: value}}."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, task: Task, **kwargs):
        super().__init__(**kwargs)
        self.task = task
        self.aspect_index = {a: i for i, a in enumerate(task.aspects)}
        self.add_state("n", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_parsed", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if task.kind in SINGLE_LABEL_KINDS:
            c = len(task.labels)
            # Rows: gold class; columns: predicted class, the last one "unparsed".
            self.add_state("confmat", default=torch.zeros(c, c + 1, dtype=torch.long), dist_reduce_fx="sum")
            a = len(task.aspects)
            self.add_state("aspect_confmat", default=torch.zeros(a, c, c + 1, dtype=torch.long), dist_reduce_fx="sum")
        elif task.kind == "multilabel":
            self._add_stat_states("", len(task.labels))
        elif task.kind == "hierarchical":
            self._add_stat_states("parent_", len(task.parents))
            self._add_stat_states("child_", len(task.children))
        else:
            raise ValueError(f"task {task.name}: unknown kind {task.kind!r}")

    def _add_stat_states(self, prefix: str, num_labels: int) -> None:
        for stat in ("tp", "fp", "fn"):
            self.add_state(prefix + stat, default=torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def has_updates(self) -> bool:
        """Whether this process saw any update since the last reset (under DDP every rank must still call
        compute() together, since compute() syncs)."""
        return bool(self.update_called)

    # ------------------------------------------------------------------ update

    def update(
        self,
        pred_labels: list[list[str]],
        gold_labels: list[list[str]],
        parsed: list[bool],
        aspects: list[str] | None = None,
    ) -> None:
        if not len(pred_labels) == len(gold_labels) == len(parsed):
            raise ValueError(
                f"lengths differ: {len(pred_labels)} predictions, {len(gold_labels)} gold, {len(parsed)} parsed flags"
            )
        if aspects is not None and len(aspects) != len(parsed):
            raise ValueError(f"lengths differ: {len(aspects)} aspects for {len(parsed)} items")
        if not parsed:
            return
        # An unparsed item counts with no prediction, whatever the caller put in pred_labels.
        preds = [list(p) if ok else [] for p, ok in zip(pred_labels, parsed)]
        self.n += len(parsed)
        self.n_parsed += sum(bool(ok) for ok in parsed)
        if self.task.kind in SINGLE_LABEL_KINDS:
            self._update_single(preds, gold_labels, aspects)
        elif self.task.kind == "multilabel":
            self._update_stats(
                "", self._multi_hot(preds, self.task.labels), self._multi_hot(gold_labels, self.task.labels)
            )
        else:
            self._update_hierarchical(preds, gold_labels)

    def _update_single(self, preds, golds, aspects) -> None:
        order, c = self.task.label_order, len(self.task.labels)
        gold_idx = []
        for gold in golds:
            if len(gold) != 1 or gold[0] not in order:
                raise ValueError(
                    f"task {self.task.name} needs exactly one gold label from {list(self.task.labels)}, got {gold}"
                )
            gold_idx.append(order[gold[0]])
        pred_idx = []
        for pred in preds:
            if len(pred) > 1:
                raise ValueError(f"task {self.task.name} is single-label, got predictions {pred}")
            if pred and pred[0] not in order:
                raise ValueError(f"label {pred[0]!r} is not in task {self.task.name}'s label set")
            pred_idx.append(order[pred[0]] if pred else c)  # c = the "unparsed" column
        gold_t = torch.tensor(gold_idx, dtype=torch.long, device=self.device)
        pred_t = torch.tensor(pred_idx, dtype=torch.long, device=self.device)
        cells = gold_t * (c + 1) + pred_t
        self.confmat += torch.bincount(cells, minlength=c * (c + 1)).view(c, c + 1)
        if aspects is None:
            return
        aspect_idx = torch.tensor([self._aspect(a) for a in aspects], dtype=torch.long, device=self.device)
        keep = aspect_idx >= 0
        if keep.any():
            size = c * (c + 1)
            flat = torch.bincount(aspect_idx[keep] * size + cells[keep], minlength=len(self.task.aspects) * size)
            self.aspect_confmat += flat.view(-1, c, c + 1)

    def _aspect(self, aspect: str | None) -> int:
        if not aspect:
            return -1
        if aspect not in self.aspect_index:
            raise ValueError(
                f"aspect {aspect!r} is not one of task {self.task.name}'s aspects {list(self.task.aspects)}"
            )
        return self.aspect_index[aspect]

    def _multi_hot(self, label_lists, names) -> torch.Tensor:
        index = {name: i for i, name in enumerate(names)}
        hot = torch.zeros(len(label_lists), len(names), dtype=torch.bool)
        for row, labels in enumerate(label_lists):
            for label in labels:
                if label not in index:
                    raise ValueError(f"label {label!r} is not in task {self.task.name}'s label set")
                hot[row, index[label]] = True
        return hot.to(self.device)

    def _update_stats(self, prefix: str, pred: torch.Tensor, gold: torch.Tensor) -> None:
        setattr(self, prefix + "tp", getattr(self, prefix + "tp") + (pred & gold).sum(0))
        setattr(self, prefix + "fp", getattr(self, prefix + "fp") + (pred & ~gold).sum(0))
        setattr(self, prefix + "fn", getattr(self, prefix + "fn") + (~pred & gold).sum(0))

    def _update_hierarchical(self, preds, golds) -> None:
        pred_sets = [cp_parent_child_sets(self.task, p) for p in preds]
        gold_sets = [cp_parent_child_sets(self.task, g) for g in golds]
        parents, children = tuple(self.task.parents), self.task.children
        self._update_stats(
            "parent_",
            self._multi_hot([s[0] for s in pred_sets], parents),
            self._multi_hot([s[0] for s in gold_sets], parents),
        )
        self._update_stats(
            "child_",
            self._multi_hot([s[1] for s in pred_sets], children),
            self._multi_hot([s[1] for s in gold_sets], children),
        )

    # ------------------------------------------------------------------ compute

    def compute(self) -> dict[str, dict]:
        n, n_parsed = int(self.n), int(self.n_parsed)
        common = {"parse_rate": _div(n_parsed, n), "n": n}
        task = self.task
        if task.kind in SINGLE_LABEL_KINDS:
            return {task.name: {**self._single_label_metrics(self.confmat.tolist()), **common}}
        if task.kind == "multilabel":
            return {task.name: {**_micro(self.tp, self.fp, self.fn, task.labels), **common}}
        parent_key, child_key = task.metric_keys
        return {
            parent_key: {**_micro(self.parent_tp, self.parent_fp, self.parent_fn, tuple(task.parents)), **common},
            child_key: {**_micro(self.child_tp, self.child_fp, self.child_fn, task.children), **common},
        }

    def _single_label_metrics(self, cm: list[list[int]]) -> dict:
        task = self.task
        per_class = _per_class(cm)
        accuracy = _div(sum(cm[i][i] for i in range(len(cm))), sum(map(sum, cm)))
        weighted = _weighted(per_class)
        if task.kind == "binary":
            p, r, f1, _ = per_class[task.label_order[task.positive]]
        else:
            p, r, f1 = weighted
        out = {
            "precision": p,
            "recall": r,
            "f1": f1,
            "accuracy": accuracy,
            "f1_weighted": weighted[2],
            "per_label": {lab: per_class[i][2] for i, lab in enumerate(task.labels)},
            "confusion": cm,
            "confusion_labels": [*task.labels, UNPARSED],
        }
        if task.aspects:
            out["per_aspect"] = {}
            for aspect, acm in zip(task.aspects, self.aspect_confmat.tolist()):
                if sum(map(sum, acm)):
                    stats = _per_class(acm)
                    pos = stats[task.label_order[task.positive]][2] if task.kind == "binary" else _weighted(stats)[2]
                    out["per_aspect"][aspect] = pos
        return out


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def _per_class(cm: list[list[int]]) -> list[tuple[float, float, float, int]]:
    """(precision, recall, f1, support) per gold class; predictions in the unparsed column hit nothing."""
    stats = []
    for i, row in enumerate(cm):
        tp, support, predicted = row[i], sum(row), sum(r[i] for r in cm)
        stats.append((_div(tp, predicted), _div(tp, support), _div(2 * tp, support + predicted), support))
    return stats


def _weighted(stats) -> tuple[float, float, float]:
    total = sum(s[3] for s in stats)
    return tuple(_div(sum(s[k] * s[3] for s in stats), total) for k in range(3))


def _micro(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, names) -> dict:
    tp, fp, fn = tp.tolist(), fp.tolist(), fn.tolist()
    t, f_p, f_n = sum(tp), sum(fp), sum(fn)
    return {
        "precision": _div(t, t + f_p),
        "recall": _div(t, t + f_n),
        "f1": _div(2 * t, 2 * t + f_p + f_n),
        "per_label": {name: _div(2 * a, 2 * a + b + c) for name, a, b, c in zip(names, tp, fp, fn)},
        "support": {name: a + c for name, a, c in zip(names, tp, fn)},
    }


def compute_metrics(task: Task, pred_labels, gold_labels, parsed, aspects=None) -> dict[str, dict]:
    """One-shot helper: metrics of one task's predictions (local: never synced across ranks)."""
    metric = TaskMetrics(task, sync_on_compute=False)
    metric.update(pred_labels, gold_labels, parsed, aspects)
    return metric.compute()


def mean_f1(results: dict[str, dict]) -> float:
    """Mean F1 over the metric keys present (cp counts twice: cp_parent and cp_child); 0.0 when empty."""
    f1s = [results[k]["f1"] for k in result_keys(results)]
    return sum(f1s) / len(f1s) if f1s else 0.0


def majority_baseline(task: Task, train_rows: list[dict], eval_rows: list[dict]) -> dict[str, dict]:
    """Metrics of always answering the most frequent training label set (per aspect for aspect tasks).

    The floor a trained model must clear; reported next to the test table so a run that learned nothing shows.
    """
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in train_rows:
        counts[row.get("aspect") or ""][tuple(row["labels"])] += 1
    overall = Counter()
    for c in counts.values():
        overall.update(c)
    if not overall or not eval_rows:
        return {}

    def guess(aspect: str) -> list[str]:
        return list((counts.get(aspect) or overall).most_common(1)[0][0])

    preds = [guess(r.get("aspect") or "") for r in eval_rows]
    return compute_metrics(
        task,
        preds,
        [list(r["labels"]) for r in eval_rows],
        [True] * len(eval_rows),
        [r.get("aspect") or "" for r in eval_rows],
    )
