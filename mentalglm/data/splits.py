"""Train/val/test splits over every configured task, reproducible from one seed.

A task spec (one entry of `data.tasks`):

    {train: path, val: path | null, val_size: int | float | null, test: path | null, format: str | null}

optional keys: `task` (the task name when the entry's key is not one, or null for alpaca/chat files
whose rows name their task) and `hub_splits` ({train: "train", val: "validation", test: "test"} for
Hub dataset ids). When `val` is null and `val_size` is set, val is carved out of train with a
seeded shuffle, stratified by label for single-label tasks. The paper's splits come out as:
SOS-HL-1K 749/250/250 (val_size 250, released val -> test), SocialCD-3K 2043/682/682 (val_size 682),
CP and IMHI as released.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Mapping

from mentalglm.data.io import LoadReport
from mentalglm.data.loaders import load_records
from mentalglm.tasks import TASKS, get_task

SPLITS = ("train", "val", "test")
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
SPEC_KEYS = {"train", "val", "val_size", "test", "format", "task", "hub_splits"}


def build_splits(tasks_cfg: Mapping[str, Mapping], *, seed: int, on_error: str = "raise",
                 report: LoadReport | None = None, templates: Mapping | None = None) -> dict[str, list[dict]]:
    """Load every task's files and return {"train": [...], "val": [...], "test": [...]} (tasks in cfg order)."""
    templates = dict(templates or {})
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for key, spec in tasks_cfg.items():
        for split, records in _task_splits(key, dict(spec or {}), seed, on_error, report, templates).items():
            out[split].extend(records)
    return out


def _task_splits(key: str, spec: dict, seed: int, on_error: str, report, templates) -> dict[str, list[dict]]:
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"data.tasks.{key}: unknown keys {sorted(unknown)}; expected {sorted(SPEC_KEYS)}")
    val_size = spec.get("val_size")
    if val_size and spec.get("val"):
        raise ValueError(f"data.tasks.{key}: give either val or val_size, not both")
    name = spec.get("task", key if key in TASKS else None)
    task = get_task(name, templates.get(name)) if name else None
    hub = {**HUB_SPLITS, **(spec.get("hub_splits") or {})}

    def load(split: str) -> list[dict]:
        source = spec.get(split)
        if not source:
            return []
        return load_records(task, source, spec.get("format"), on_error=on_error, report=report,
                            hub_split=hub[split], templates=templates)

    splits = {s: load(s) for s in SPLITS}
    if val_size:
        splits["train"], splits["val"] = carve_val(splits["train"], val_size, seed=seed, key=key)
    return splits


def carve_val(records: list[dict], val_size: int | float, *, seed: int, key: str = "") -> tuple[list[dict], list[dict]]:
    """Move `val_size` items (a count, or a fraction when < 1) from train to val; both keep file order."""
    n = len(records)
    k = round(val_size * n) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < k < n:
        raise ValueError(f"data.tasks.{key}: val_size {val_size} does not fit {n} train items")
    # One RNG per (seed, task): adding a task to the config does not reshuffle the others.
    rng = random.Random(f"{seed}/{key}")
    groups = _strata(records)
    quotas = _quotas({g: len(idx) for g, idx in groups.items()}, k)
    chosen = set()
    for g, idx in groups.items():
        idx = list(idx)
        rng.shuffle(idx)
        chosen.update(idx[: quotas[g]])
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [r for i, r in enumerate(records) if i in chosen]
    return train, val


def _strata(records: list[dict]) -> dict[tuple, list[int]]:
    """Indices grouped by (task, label) for single-label tasks; one group per task otherwise."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        task = TASKS.get(r["task"])
        single = task is not None and task.kind in ("binary", "multiclass")
        groups[(r["task"], *(r["labels"] if single else ()))].append(i)
    return dict(sorted(groups.items()))


def _quotas(sizes: dict[tuple, int], k: int) -> dict[tuple, int]:
    """Proportional allocation of k over the groups (largest remainder, ties in group order)."""
    n = sum(sizes.values())
    exact = {g: k * s / n for g, s in sizes.items()}
    quotas = {g: int(x) for g, x in exact.items()}
    rest = sorted(sizes, key=lambda g: -(exact[g] - quotas[g]))
    for g in rest[: k - sum(quotas.values())]:
        quotas[g] += 1
    return quotas


# ----------------------------------------------------------------------------- split files (ids only)


def _ids_sha256(records: list[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r['task']}\t{r['id']}\n".encode())
    return h.hexdigest()


def split_fingerprint(splits: Mapping[str, list[dict]]) -> str:
    """sha256 over every split's item ids: equal fingerprints mean the same items in the same order."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(f"{name}\t{_ids_sha256(splits[name])}\n".encode())
    return h.hexdigest()


def save_split(splits: Mapping[str, list[dict]], path: str | Path) -> Path:
    """Write the split's item ids per split and task with checksums; never any post text."""
    doc = {"fingerprint": split_fingerprint(splits), "splits": {}}
    for name, records in splits.items():
        by_task: dict[str, list[str]] = {}
        for r in records:
            by_task.setdefault(r["task"], []).append(r["id"])
        doc["splits"][name] = {"n": len(records), "sha256": _ids_sha256(records), "ids": by_task}
    from mentalglm.eval.atomic import write_atomic

    return write_atomic(path, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
