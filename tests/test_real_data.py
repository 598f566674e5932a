"""Every real file in ../shared/data loads with the documented counts (skipped when the folder is absent).

Never prints posts: assertions compare counts, labels and ids only.
"""

import time
from collections import Counter

import pytest

from mentalglm.data.loaders import load_records
from mentalglm.data.paths import shared_data_dir
from mentalglm.data.splits import build_splits, split_fingerprint

D = shared_data_dir()
pytestmark = [pytest.mark.real_data, pytest.mark.skipif(D is None, reason="no shared real data (../shared/data)")]

LOW, HIGH = "低自杀风险", "高自杀风险"
INSTR = "imhi/train_data/instruction_data"
COMPLETE = "imhi/train_data/complete_data"
IMHI_FILES = [  # task, instruction file, completion file, count
    ("dr", "DR/train.csv", "DR/reddit_train.csv", 1003),
    ("dr", "DR/val.csv", "DR/reddit_valid.csv", 430),
    ("dreaddit", "dreaddit/train.csv", "dreaddit/dreaddit-train.csv", 2837),
    ("dreaddit", "dreaddit/val.csv", "dreaddit/val.csv", 300),
    ("sad", "SAD/train.csv", "SAD/train.csv", 5547),
    ("sad", "SAD/val.csv", "SAD/val.csv", 616),
    ("irf", "Irf/val.csv", "Irf/val.csv", 985),
    ("multiwd", "MultiWD/val.csv", "MultiWD/val.csv", 1500),
]
EXPERT = {
    "CAMS": "cams",
    "DR": "dr",
    "Irf": "irf",
    "MultiWD": "multiwd",
    "SAD": "sad",
    "dreaddit": "dreaddit",
    "loneliness": "loneliness",
    "swmh": "swmh",
    "t-sid": "t_sid",
}


def labels(records):
    return Counter(r["labels"][0] for r in records)


@pytest.mark.parametrize("split,n,low,high", [("train", 999, 522, 477), ("val", 250, 126, 124)])
def test_sos_hl_1k(split, n, low, high):
    llm = load_records(None, D / f"sos_hl_1k/suicide_{split}_LLM.csv")
    bert = load_records(None, D / f"sos_hl_1k/suicide_{split}_BERT.tsv")
    assert len(llm) == len(bert) == n
    assert labels(llm) == labels(bert) == {LOW: low, HIGH: high}
    assert [r["id"] for r in llm] == [str(i) for i in range(1, n + 1)] == [r["id"] for r in bert]
    for a, b in zip(llm, bert):
        assert a["labels"] == b["labels"]
        post_a, post_b = (r["query"][r["post_start"] : r["post_end"]] for r in (a, b))
        # GBK cannot hold every character (e.g. zero-width spaces): the BERT file writes "?".
        assert post_b == post_a.encode("gbk", errors="replace").decode("gbk")


@pytest.mark.parametrize("name,n", [("train", 2725), ("test", 682)])
def test_socialcd_3k(name, n):
    records = load_records(None, D / f"socialcd_3k/{name}_data_with_header.tsv")
    assert len(records) == n
    assert all(r["labels"] for r in records)  # every post has at least one label


@pytest.mark.parametrize("task,instr,complete,n", IMHI_FILES)
def test_imhi_instruction_and_completion_forms_agree(task, instr, complete, n):
    a = load_records(task, D / INSTR / instr)
    b = load_records(task, D / COMPLETE / complete)
    assert len(a) == len(b) == n
    assert [r["labels"] for r in a] == [r["labels"] for r in b]
    assert [r["aspect"] for r in a] == [r["aspect"] for r in b]
    assert [r["answer"] for r in a] == [r["answer"] for r in b]
    # The posts differ only where the release does: the instruction files collapse some runs of
    # spaces differently and cut the longest DR posts.
    same = 0
    for x, y in zip(a, b):
        px, py = (" ".join(r["query"][r["post_start"] : r["post_end"]].split()) for r in (x, y))
        assert px == py or (task == "dr" and py.startswith(px))
        same += x == y
    assert same / n > 0.9


def test_imhi_aspects():
    assert Counter(r["aspect"] for r in load_records("irf", D / INSTR / "Irf/val.csv")) == {
        "thwarted belongingness": 493,
        "perceived burdensomeness": 492,
    }
    assert set(Counter(r["aspect"] for r in load_records("multiwd", D / INSTR / "MultiWD/val.csv")).values()) == {250}


@pytest.mark.parametrize("name,task", EXPERT.items())
def test_expert_examples(name, task):
    assert len(load_records(task, D / f"imhi/expert_examples/{name}.csv")) == 35


def test_imhi_loads_fast():
    start = time.process_time()  # this process's CPU: the bound holds beside another test worker
    for task, instr, complete, _ in IMHI_FILES:
        load_records(task, D / INSTR / instr)
        load_records(task, D / COMPLETE / complete)
    assert time.process_time() - start < 10


def real_cfg():
    return {
        "sos_hl_1k": {
            "train": D / "sos_hl_1k/suicide_train_LLM.csv",
            "val": None,
            "val_size": 250,
            "test": D / "sos_hl_1k/suicide_val_LLM.csv",
        },
        "socialcd_3k": {
            "train": D / "socialcd_3k/train_data_with_header.tsv",
            "val": None,
            "val_size": 682,
            "test": D / "socialcd_3k/test_data_with_header.tsv",
        },
        "dr": {"train": D / INSTR / "DR/train.csv", "val": D / INSTR / "DR/val.csv"},
        "dreaddit": {"train": D / INSTR / "dreaddit/train.csv", "val": D / INSTR / "dreaddit/val.csv"},
        "sad": {"train": D / INSTR / "SAD/train.csv", "val": D / INSTR / "SAD/val.csv"},
    }


def test_paper_splits():
    s = build_splits(real_cfg(), seed=42)
    n = {split: Counter(r["task"] for r in recs) for split, recs in s.items()}
    assert [n[x]["sos_hl_1k"] for x in ("train", "val", "test")] == [749, 250, 250]
    assert [n[x]["socialcd_3k"] for x in ("train", "val", "test")] == [2043, 682, 682]
    assert [n[x]["dr"] for x in ("train", "val", "test")] == [1003, 430, 0]
    assert [n[x]["dreaddit"] for x in ("train", "val", "test")] == [2837, 300, 0]
    assert [n[x]["sad"] for x in ("train", "val", "test")] == [5547, 616, 0]
    val = Counter(r["labels"][0] for r in s["val"] if r["task"] == "sos_hl_1k")
    assert abs(val[HIGH] - 250 * 477 / 999) <= 1  # stratified
    assert split_fingerprint(s) == split_fingerprint(build_splits(real_cfg(), seed=42))
