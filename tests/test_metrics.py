"""Every metric against scikit-learn on seeded random data, unparsed items included."""

import random

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from mentalglm.scoring.metrics import TaskMetrics, compute_metrics, mean_f1, result_keys
from mentalglm.tasks import TASKS

N = 300


def random_single(task, rng, n=N):
    """(pred, gold, parsed, aspects); ~20% unparsed, some of them with a leftover prediction."""
    gold = [[rng.choice(task.labels)] for _ in range(n)]
    parsed = [rng.random() > 0.2 for _ in range(n)]
    pred = [[rng.choice(task.labels)] if ok or rng.random() < 0.5 else [] for ok in parsed]
    aspects = [rng.choice(task.aspects + ("",)) for _ in range(n)] if task.aspects else None
    return pred, gold, parsed, aspects


def sklearn_single(task, pred, gold, parsed):
    c = len(task.labels)
    order = task.label_order
    y_true = np.array([order[g[0]] for g in gold])
    y_pred = np.array([order[p[0]] if ok and p else c for p, ok in zip(pred, parsed)])  # c = unparsed
    return y_true, y_pred, list(range(c))


def close(a, b):
    return a == pytest.approx(b, abs=1e-12)


@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if t.kind in ("binary", "multiclass")])
def test_single_label_vs_sklearn(name):
    task = TASKS[name]
    rng = random.Random(sum(map(ord, name)))
    pred, gold, parsed, aspects = random_single(task, rng)
    out = compute_metrics(task, pred, gold, parsed, aspects)
    assert list(out) == [name]
    m = out[name]
    y_true, y_pred, labels = sklearn_single(task, pred, gold, parsed)

    wp, wr, wf, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
    if task.kind == "binary":
        pos = task.label_order[task.positive]
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=[pos], average=None, zero_division=0)
        assert close(m["precision"], p[0]) and close(m["recall"], r[0]) and close(m["f1"], f[0])
    else:
        assert close(m["precision"], wp) and close(m["recall"], wr) and close(m["f1"], wf)
    assert close(m["f1_weighted"], wf)
    assert close(m["accuracy"], accuracy_score(y_true, y_pred))
    assert close(m["parse_rate"], sum(parsed) / N)
    assert m["n"] == N

    per_label = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    assert list(m["per_label"]) == list(task.labels)
    assert all(close(a, b) for a, b in zip(m["per_label"].values(), per_label))

    cm = confusion_matrix(y_true, y_pred, labels=labels + [len(labels)])
    assert m["confusion"] == cm[: len(labels)].tolist()
    assert m["confusion_labels"] == [*task.labels, "unparsed"]

    if task.aspects:
        for aspect in task.aspects:
            idx = [i for i, a in enumerate(aspects) if a == aspect]
            pos = task.label_order[task.positive]
            expected = f1_score(y_true[idx], y_pred[idx], labels=[pos], average=None, zero_division=0)[0]
            assert close(m["per_aspect"][aspect], expected), aspect
    else:
        assert "per_aspect" not in m


def test_binary_unparsed_is_a_false_negative_never_a_hit():
    task = TASKS["dr"]
    m = compute_metrics(task, [["yes"], [], []], [["yes"], ["yes"], ["no"]], [True, False, False])["dr"]
    assert (m["precision"], m["recall"], m["accuracy"]) == (1.0, 0.5, 1 / 3)
    assert m["confusion"] == [[0, 0, 1], [0, 1, 1]]
    # A prediction left on an unparsed item is ignored.
    m2 = compute_metrics(task, [["yes"], ["yes"], ["no"]], [["yes"], ["yes"], ["no"]], [True, False, False])["dr"]
    assert m2 == m


def random_multi(labels, rng, n=N):
    gold = [[lab for lab in labels if rng.random() < 0.2] for _ in range(n)]
    parsed = [rng.random() > 0.15 for _ in range(n)]
    pred = [[lab for lab in labels if rng.random() < 0.2] for _ in range(n)]
    return pred, gold, parsed


def multi_hot(label_lists, names):
    return np.array([[name in set(labels) for name in names] for labels in label_lists], dtype=int)


def test_multilabel_vs_sklearn():
    task = TASKS["socialcd_3k"]
    pred, gold, parsed = random_multi(task.labels, random.Random(0))
    m = compute_metrics(task, pred, gold, parsed)["socialcd_3k"]
    y_true = multi_hot(gold, task.labels)
    y_pred = multi_hot([p if ok else [] for p, ok in zip(pred, parsed)], task.labels)  # unparsed: all zeros
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    assert close(m["precision"], p) and close(m["recall"], r) and close(m["f1"], f)
    per_label = f1_score(y_true, y_pred, average=None, zero_division=0)
    assert all(close(a, b) for a, b in zip(m["per_label"].values(), per_label))
    assert list(m["per_label"]) == list(task.labels)
    assert close(m["parse_rate"], sum(parsed) / N) and m["n"] == N


def split_cp(task, labels):
    """Independent of the code under test: parents and children by splitting the leaf name."""
    parents, children = set(), set()
    for lab in labels:
        parent, _, child = lab.partition(task.child_sep)
        parents.add(parent)
        if child:
            children.add(child)
    return parents, children


def test_hierarchical_vs_sklearn():
    task = TASKS["cp"]
    pred, gold, parsed = random_multi(task.labels, random.Random(1))
    out = compute_metrics(task, pred, gold, parsed)
    assert list(out) == ["cp_parent", "cp_child"]
    kept = [p if ok else [] for p, ok in zip(pred, parsed)]
    for key, level, names in (("cp_parent", 0, list(task.parents)), ("cp_child", 1, list(task.children))):
        y_true = multi_hot([split_cp(task, g)[level] for g in gold], names)
        y_pred = multi_hot([split_cp(task, p)[level] for p in kept], names)
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
        m = out[key]
        assert close(m["precision"], p) and close(m["recall"], r) and close(m["f1"], f), key
        per_label = f1_score(y_true, y_pred, average=None, zero_division=0)
        assert list(m["per_label"]) == names
        assert all(close(a, b) for a, b in zip(m["per_label"].values(), per_label))
        assert m["n"] == N and close(m["parse_rate"], sum(parsed) / N)


@pytest.mark.parametrize("name", ["sos_hl_1k", "sad", "multiwd", "socialcd_3k", "cp"])
def test_batches_accumulate_and_reset(name):
    task = TASKS[name]
    rng = random.Random(7)
    if task.kind in ("binary", "multiclass"):
        pred, gold, parsed, aspects = random_single(task, rng)
    else:
        (pred, gold, parsed), aspects = random_multi(task.labels, rng), None
    whole = compute_metrics(task, pred, gold, parsed, aspects)
    metric = TaskMetrics(task)
    for start in range(0, N, 64):
        sl = slice(start, start + 64)
        metric.update(pred[sl], gold[sl], parsed[sl], aspects[sl] if aspects else None)
    assert metric.compute() == whole
    assert metric.has_updates()
    metric.reset()
    assert not metric.has_updates()
    metric.update(pred[:10], gold[:10], parsed[:10], aspects[:10] if aspects else None)
    assert metric.compute() == compute_metrics(
        task, pred[:10], gold[:10], parsed[:10], aspects[:10] if aspects else None
    )


def test_states_are_sum_reduced_tensors():
    metric = TaskMetrics(TASKS["sad"])
    assert set(metric._defaults) >= {"n", "n_parsed", "confmat"}
    assert all(fx is not None for fx in metric._reductions.values())
    metric = metric.to(torch.device("cpu"))
    metric.update([["work"]], [["work"]], [True])
    assert metric.compute()["sad"]["accuracy"] == 1.0


def test_empty_metrics_do_not_crash():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = TaskMetrics(TASKS["cp"]).compute()
    assert out["cp_parent"]["n"] == 0 and out["cp_child"]["f1"] == 0.0


@pytest.mark.parametrize(
    "args, match",
    [
        (([["maybe"]], [["yes"]], [True]), "not in task dr"),
        (([["yes"]], [["maybe"]], [True]), "exactly one gold label"),
        (([["yes"]], [["yes", "no"]], [True]), "exactly one gold label"),
        (([["yes", "no"]], [["yes"]], [True]), "single-label"),
        (([["yes"]], [["yes"]], [True, False]), "lengths differ"),
    ],
)
def test_bad_updates_raise(args, match):
    with pytest.raises(ValueError, match=match):
        TaskMetrics(TASKS["dr"]).update(*args)


def test_bad_labels_and_aspects_raise():
    with pytest.raises(ValueError, match="aspect"):
        TaskMetrics(TASKS["irf"]).update([["yes"]], [["yes"]], [True], ["spiritual"])
    with pytest.raises(ValueError, match="not in task socialcd_3k"):
        TaskMetrics(TASKS["socialcd_3k"]).update([["妄下结论"]], [[]], [True])
    with pytest.raises(ValueError, match="not in task cp"):
        TaskMetrics(TASKS["cp"]).update([["放大和缩小"]], [[]], [True])


def test_mean_f1_and_key_order():
    results = {"cp_child": {"f1": 0.2}, "sos_hl_1k": {"f1": 0.8}, "cp_parent": {"f1": 0.5}}
    assert mean_f1(results) == pytest.approx(0.5)
    assert mean_f1({}) == 0.0
    assert mean_f1({**results, "f1_mean": 0.9}) == pytest.approx(0.5)  # summary entries are skipped
    # Keys keep the order of the results (the selected tasks' order), summary entries left out.
    assert result_keys({**results, "f1_mean": 0.5, "dr": {"f1": 1.0}}) == ["cp_child", "sos_hl_1k", "cp_parent", "dr"]


def test_merge_state_and_forward_match_one_pass():
    # merge_state is what a DDP sync amounts to for sum-reduced states; forward gives per-batch values.
    task = TASKS["multiwd"]
    pred, gold, parsed, aspects = random_single(task, random.Random(3))
    whole = compute_metrics(task, pred, gold, parsed, aspects)
    a, b = TaskMetrics(task), TaskMetrics(task)
    a.update(pred[:100], gold[:100], parsed[:100], aspects[:100])
    b.update(pred[100:], gold[100:], parsed[100:], aspects[100:])
    a.merge_state(b)
    assert a.compute() == whole
    c = TaskMetrics(task)
    batch = c(pred[:100], gold[:100], parsed[:100], aspects[:100])
    assert batch == compute_metrics(task, pred[:100], gold[:100], parsed[:100], aspects[:100])
    c(pred[100:], gold[100:], parsed[100:], aspects[100:])
    assert c.compute() == whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["dr", "socialcd_3k", "cp"])
def test_on_gpu(name):
    task = TASKS[name]
    rng = random.Random(5)
    if task.kind == "binary":
        pred, gold, parsed, _ = random_single(task, rng)
    else:
        pred, gold, parsed = random_multi(task.labels, rng)
    metric = TaskMetrics(task).to("cuda")
    metric.update(pred, gold, parsed)
    assert metric.compute() == compute_metrics(task, pred, gold, parsed)
