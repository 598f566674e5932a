import hashlib
import json
from collections import Counter

import pytest

from mentalglm.data.io import LoadReport
from mentalglm.data.paths import FIXTURES_DIR
from mentalglm.data.splits import build_splits, carve_val, save_split, split_fingerprint
from mentalglm.tasks import TASKS

F = FIXTURES_DIR
IMHI = [n for n, t in TASKS.items() if t.format == "imhi_instruction"]


def fixture_cfg(tasks=None):
    cfg = {
        "sos_hl_1k": {
            "train": F / "sos_hl_1k/suicide_train_LLM.csv",
            "val": None,
            "val_size": 20,
            "test": F / "sos_hl_1k/suicide_val_LLM.csv",
            "format": None,
        },
        "socialcd_3k": {
            "train": F / "socialcd_3k/train_data_with_header.tsv",
            "val": None,
            "val_size": 20,
            "test": F / "socialcd_3k/test_data_with_header.tsv",
            "format": None,
        },
        "cp": {"train": F / "cp/train.txt", "val": F / "cp/val.txt", "test": F / "cp/test.txt"},
        **{t: {"train": F / f"imhi/{t}/train.csv", "val": F / f"imhi/{t}/val.csv"} for t in IMHI},
    }
    return {k: v for k, v in cfg.items() if tasks is None or k in tasks}


def count(records):
    return Counter(r["task"] for r in records)


def ids(records, task):
    return [r["id"] for r in records if r["task"] == task]


def test_fixture_split_sizes():
    s = build_splits(fixture_cfg(), seed=0)
    assert set(s) == {"train", "val", "test"}
    assert count(s["train"])["sos_hl_1k"] == 60 and count(s["val"])["sos_hl_1k"] == 20
    assert count(s["test"])["sos_hl_1k"] == 30
    assert (count(s["train"])["socialcd_3k"], count(s["val"])["socialcd_3k"], count(s["test"])["socialcd_3k"]) == (
        220,
        20,
        40,
    )
    assert (count(s["train"])["cp"], count(s["val"])["cp"], count(s["test"])["cp"]) == (200, 30, 30)
    for t in IMHI:
        assert (count(s["train"])[t], count(s["val"])[t], count(s["test"])[t]) == (30, 10, 0)


def test_carved_val_is_disjoint_and_complete():
    full = build_splits(
        fixture_cfg(["sos_hl_1k"]) | {"sos_hl_1k": {"train": F / "sos_hl_1k/suicide_train_LLM.csv"}}, seed=0
    )["train"]
    s = build_splits(fixture_cfg(["sos_hl_1k"]), seed=0)
    train, val = ids(s["train"], "sos_hl_1k"), ids(s["val"], "sos_hl_1k")
    assert not set(train) & set(val)
    assert sorted(train + val, key=int) == [r["id"] for r in full]
    assert train == sorted(train, key=int) and val == sorted(val, key=int)  # file order kept


def test_val_is_stratified_for_single_label_tasks():
    s = build_splits(fixture_cfg(["sos_hl_1k"]), seed=3)
    assert Counter(r["labels"][0] for r in s["val"]) == {"高自杀风险": 10, "低自杀风险": 10}


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    a = build_splits(fixture_cfg(), seed=7)
    b = build_splits(fixture_cfg(), seed=7)
    c = build_splits(fixture_cfg(), seed=8)
    assert json.dumps(a, ensure_ascii=False) == json.dumps(b, ensure_ascii=False)
    save_split(a, tmp_path / "a.json")
    save_split(b, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert split_fingerprint(a) == split_fingerprint(b) != split_fingerprint(c)
    assert ids(a["val"], "sos_hl_1k") != ids(c["val"], "sos_hl_1k")
    assert ids(a["val"], "cp") == ids(c["val"], "cp")  # released splits do not depend on the seed


def test_adding_a_task_does_not_reshuffle_the_others():
    alone = build_splits(fixture_cfg(["socialcd_3k"]), seed=1)
    together = build_splits(fixture_cfg(["sos_hl_1k", "socialcd_3k"]), seed=1)
    assert ids(alone["val"], "socialcd_3k") == ids(together["val"], "socialcd_3k")


def test_val_size_fraction():
    cfg = fixture_cfg(["socialcd_3k"])
    cfg["socialcd_3k"]["val_size"] = 0.25
    s = build_splits(cfg, seed=0)
    assert len(s["val"]) == 60 and len(s["train"]) == 180


def test_carve_val_quotas_sum_to_k():
    records = [{"task": "sad", "id": str(i), "labels": [TASKS["sad"].labels[i % 9]]} for i in range(101)]
    train, val = carve_val(records, 33, seed=0, key="sad")
    assert len(val) == 33 and len(train) == 68
    assert max(Counter(r["labels"][0] for r in val).values()) - min(Counter(r["labels"][0] for r in val).values()) <= 1


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"val": "x.csv", "val_size": 5}, "either val or val_size"),
        ({"val_size": 500}, "does not fit"),
        ({"val_size": 10, "vall": "typo"}, "unknown keys"),
    ],
)
def test_bad_specs(spec, match):
    cfg = fixture_cfg(["sos_hl_1k"])
    cfg["sos_hl_1k"] = {"train": cfg["sos_hl_1k"]["train"], **spec}
    with pytest.raises(ValueError, match=match):
        build_splits(cfg, seed=0)


def test_save_split_holds_ids_only(tmp_path):
    s = build_splits(fixture_cfg(), seed=0)
    path = save_split(s, tmp_path / "out" / "split.json")
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["fingerprint"] == split_fingerprint(s)
    for name, records in s.items():
        entry = doc["splits"][name]
        assert entry["n"] == len(records)
        assert entry["ids"] == {t: ids(records, t) for t in dict.fromkeys(r["task"] for r in records)}
        lines = "".join(f"{r['task']}\t{r['id']}\n" for r in records)
        assert entry["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    text = path.read_text(encoding="utf-8")
    for r in s["train"][:50] + s["test"][:50]:
        assert r["query"][r["post_start"] : r["post_end"]] not in text


def test_templates_reach_the_records():
    tpl = {"sos_hl_1k": {"query_template": "帖子：{post}"}}
    s = build_splits(fixture_cfg(["sos_hl_1k"]), seed=0, templates=tpl)
    assert all(r["query"].startswith("帖子：") and r["post_start"] == 3 for r in s["train"] + s["test"])
    assert split_fingerprint(s) == split_fingerprint(build_splits(fixture_cfg(["sos_hl_1k"]), seed=0))


def test_multi_task_instruction_file_entry(caplog):
    # One instruction file of several tasks: each task's entry takes its own rows.
    chat = F / "instructions/c_imhi_chat.jsonl"
    cfg = {"sos_hl_1k": {"train": chat, "format": "chat"}, "socialcd_3k": {"train": chat}}
    with caplog.at_level("INFO"):
        s = build_splits(cfg, seed=0)
    assert count(s["train"]) == {"sos_hl_1k": 4, "socialcd_3k": 3}
    assert "not configured, so not read: cp" in caplog.text


def test_skip_mode_reports_through_build_splits(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "id\tlabel\tcomment\n" + "".join(f"{i}\t{i % 2}\t帖子{i}\n" for i in range(1, 11)) + "11\t7\t坏\n",
        encoding="utf-8",
    )
    report = LoadReport()
    s = build_splits({"sos_hl_1k": {"train": bad, "val_size": 2}}, seed=0, on_error="skip", report=report)
    assert len(s["train"]) == 8 and len(s["val"]) == 2
    assert report.total_skipped == 1 and report.skipped[(str(bad), "label outside the label set")] == 1


# The paper's Table 1 (train/val per IMHI task) and the pools it is 90/10 of (REFERENCE: released train+val+test
# for DR, dreaddit, SAD, IRF, MultiWD; the test set alone for the others).
TABLE_1 = {
    "dr": (1654, 184),
    "dreaddit": (3195, 356),
    "loneliness": (477, 54),
    "swmh": (9793, 1089),
    "t_sid": (863, 96),
    "sad": (6162, 685),
    "cams": (562, 63),
    "multiwd": (17716, 1969),
    "irf": (6336, 705),
}


@pytest.mark.parametrize("task", list(TABLE_1))
def test_pooled_val_fraction_gives_the_papers_table_1_sizes(task):
    from mentalglm.data.splits import pooled_val_size

    train, val = TABLE_1[task]
    n = train + val
    assert (n - pooled_val_size(n, 0.1), pooled_val_size(n, 0.1)) == (train, val)


def test_pooled_fixture_splits_follow_the_same_arithmetic():
    import math

    spec = {"train": F / "imhi/dr/train.csv", "val": F / "imhi/dr/val.csv", "pool": ["train", "val"]}
    plain = build_splits({"dr": {k: spec[k] for k in ("train", "val")}}, seed=42)
    pooled = build_splits({"dr": {**spec, "val_fraction": 0.1}}, seed=42)
    n = len(plain["train"]) + len(plain["val"])
    assert (len(pooled["train"]), len(pooled["val"])) == (n - math.ceil(0.1 * n), math.ceil(0.1 * n))
    ids = [r["id"] for r in pooled["train"] + pooled["val"]]
    assert len(set(ids)) == n and {i.split("-")[0] for i in ids} == {"train", "val"}  # every item once
    assert build_splits({"dr": {**spec, "val_fraction": 0.1}}, seed=42) == pooled  # seeded


def test_a_test_only_stage_task_trains_only_when_pooled():
    from omegaconf import OmegaConf

    from mentalglm.runtime.builders import stage_tasks, tasks_with_split, test_tasks

    def cfg(pool):
        cams = {"stage": "one", "test": "CAMS.csv", "pool": pool, "val_fraction": 0.1 if pool else None}
        dr = {"stage": "one", "train": "DR/train.csv", "val": "DR/val.csv"}
        sos = {"stage": "two", "train": "sos.csv", "val_size": 250, "test": "sos_test.csv"}
        return OmegaConf.create({"data": {"tasks": {"cams": cams, "dr": dr, "sos_hl_1k": sos}}})

    released = cfg(None)
    names = list(released.data.tasks)
    assert stage_tasks(released, names, "one") == ["dr"]  # CAMS was released only as a test set
    assert test_tasks(released, names) == ["sos_hl_1k"]  # never trained on, so not tested after training
    assert tasks_with_split(released, names, "test") == ["cams", "sos_hl_1k"]  # evaluate.py still can
    pooled = cfg(["train", "val", "test"])
    assert stage_tasks(pooled, names, "one") == ["cams", "dr"]
    assert test_tasks(pooled, names) == ["sos_hl_1k"] and tasks_with_split(pooled, names, "test") == ["sos_hl_1k"]
