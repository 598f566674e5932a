"""Train/val/test splits over every configured task, reproducible from one seed.

A task spec (one entry of `data.tasks`, schema mentalglm/config.py TaskDataConfig):

    {train: path, val: path | null, val_size: int | float | null, test: path | null, format: str | null,
     hub_splits: {...} | null, pool: [train, val, test] | null, val_fraction: float | null}

When `val` is null and `val_size` is set, val is carved out of train with a seeded shuffle, stratified by
label for single-label tasks. With `pool`, the named splits' files are pooled and re-split: `val_fraction`
of the pool becomes val, the rest train (the recipe that reproduces the sizes of the paper's Table 1 for
IMHI tasks MentaLLaMA released only as test sets). The paper's splits come out as: SOS-HL-1K 749/250/250
(val_size 250, released val -> test), SocialCD-3K 2043/682/682 (val_size 682), CP and IMHI as released.
The same post in two splits of a task is reported (`on_leak`: warn, or error).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import unicodedata
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mentalglm.data.io import LoadReport
from mentalglm.data.loaders import load_records
from mentalglm.errors import ConfigError
from mentalglm.tasks import SINGLE_LABEL_KINDS, TASKS, Task, get_task

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
SPEC_KEYS = {"train", "val", "val_size", "test", "format", "hub_splits", "pool", "val_fraction", "definition", "stage"}
ON_LEAK = ("warn", "error")


def build_splits(
    tasks_cfg: Mapping[str, Mapping],
    *,
    seed: int,
    on_error: str = "raise",
    report: LoadReport | None = None,
    templates: Mapping | None = None,
    tasks: Mapping[str, Task] | None = None,
    on_leak: str = "warn",
) -> dict[str, list[dict]]:
    """Load every task's files and return {"train": [...], "val": [...], "test": [...]} (tasks in cfg order)."""
    if on_leak not in ON_LEAK:
        raise ConfigError(f"data.on_leak must be one of {', '.join(ON_LEAK)}, got {on_leak!r}")
    templates = dict(templates or {})
    registry = TASKS if tasks is None else tasks
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for key, spec in tasks_cfg.items():
        spec = {k: v for k, v in dict(spec or {}).items()}
        task = get_task(key, templates.get(key), registry)
        splits = _task_splits(key, spec, task, seed, on_error, report, templates, registry, set(tasks_cfg))
        check_leaks(key, splits, on_leak)
        for split, records in splits.items():
            out[split].extend(records)
    return out


def _task_splits(
    key: str, spec: dict, task: Task, seed: int, on_error: str, report, templates, registry, configured: set[str]
) -> dict[str, list[dict]]:
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"data.tasks.{key}: unknown keys {sorted(unknown)}; expected {sorted(SPEC_KEYS)}")
    val_size, pool = spec.get("val_size"), spec.get("pool")
    if val_size and spec.get("val"):
        raise ConfigError(f"data.tasks.{key}: give either val or val_size, not both")
    if pool and (val_size or not spec.get("val_fraction")):
        raise ConfigError(f"data.tasks.{key}: pool needs val_fraction (and no val_size)")
    hub = {**HUB_SPLITS, **(spec.get("hub_splits") or {})}

    def load(split: str) -> list[dict]:
        source = spec.get(split)
        if not source:
            return []
        records = load_records(
            task,
            str(source),
            spec.get("format"),
            on_error=on_error,
            report=report,
            hub_split=hub[split],
            templates=templates,
            tasks=registry,
        )
        # An instruction file may hold several tasks' rows: each task's entry takes its own.
        others = sorted({r["task"] for r in records if r["task"] != key})
        if others:
            unread = [t for t in others if t not in configured]
            (log.warning if unread else log.debug)(
                "data.tasks.%s.%s: the file also holds rows of %s, read by their own entries%s",
                key,
                split,
                ", ".join(others),
                f" (not configured, so not read: {', '.join(unread)})" if unread else "",
            )
        return [r for r in records if r["task"] == key]

    splits = {s: load(s) for s in SPLITS}
    if pool:
        bad = [s for s in pool if s not in SPLITS]
        if bad:
            raise ConfigError(f"data.tasks.{key}.pool: {bad} are not splits; choose from {', '.join(SPLITS)}")
        # Ids are row numbers per file: prefix them with the split they came from, so pooled ids stay unique.
        pooled = [{**r, "id": f"{s}-{r['id']}"} for s in pool for r in splits[s]]
        train, val = carve_val(
            pooled, pooled_val_size(len(pooled), spec["val_fraction"], key), seed=seed, key=key, tasks=registry
        )
        splits = {"train": train, "val": val, "test": [] if "test" in pool else splits["test"]}
    elif val_size:
        splits["train"], splits["val"] = carve_val(splits["train"], val_size, seed=seed, key=key, tasks=registry)
    return splits


def pooled_val_size(n: int, val_fraction, key: str = "") -> int:
    """ceil(val_fraction x n), as scikit-learn's train_test_split sizes a test split: what gives every size of the
    paper's Table 1 (DR 1838 -> 1654/184, CAMS 625 -> 562/63)."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"data.tasks.{key}: val_fraction must be a fraction between 0 and 1, got {val_fraction!r}")
    if n < 2:
        raise ConfigError(f"data.tasks.{key}: pool holds {n} items; at least 2 are needed to split")
    return math.ceil(val_fraction * n - 1e-9)


def post_of(record: dict) -> str:
    start, end = record.get("post_start", -1), record.get("post_end", -1)
    text = record["query"][start:end] if start is not None and start >= 0 else record["query"]
    return " ".join(text.split())


# Characters that change no reading of a post: a copy differing only by them is the same post.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))


def leak_key(record: dict) -> str:
    """What two copies of a post share: NFKC-normalised (full-width -> half-width), zero-width characters and
    soft hyphens removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", post_of(record)).translate(INVISIBLE)
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def check_leaks(key: str, splits: Mapping[str, list[dict]], on_leak: str = "warn") -> dict[str, int]:
    """Posts of a task that occur in two of its splits, counted per pair (no post text is ever shown)."""
    hashes = {s: {leak_key(r) for r in rows} for s, rows in splits.items()}
    found = {}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            n = len(hashes.get(a, set()) & hashes.get(b, set()))
            if n:
                found[f"{a}/{b}"] = n
    if found:
        counts = ", ".join(f"{n} in {pair}" for pair, n in found.items())
        message = (
            f"data.tasks.{key}: the same post occurs in two splits ({counts}); scores on the later split are "
            "optimistic for those items"
        )
        if on_leak == "error":
            raise ConfigError(f"{message} (data.on_leak=error)")
        log.warning("%s (data.on_leak=error makes this an error)", message)
    return found


def carve_val(
    records: list[dict], val_size: Any, *, seed: int, key: str = "", tasks: Mapping[str, Task] | None = None
) -> tuple[list[dict], list[dict]]:
    """Move `val_size` items (a count, or a fraction when < 1) from train to val; both keep file order."""
    n = len(records)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ConfigError(f"data.tasks.{key}: val_size must be a count or a fraction, got {val_size!r}")
    k = round(val_size * n) if val_size < 1 else int(val_size)
    if val_size >= 1 and val_size != int(val_size):
        raise ConfigError(f"data.tasks.{key}: val_size {val_size} is neither a count nor a fraction below 1")
    if not 0 < k < n:
        raise ConfigError(f"data.tasks.{key}: val_size {val_size} does not fit {n} train items")
    # One RNG per (seed, task): adding a task to the config does not reshuffle the others.
    rng = random.Random(f"{seed}/{key}")
    groups = _strata(records, TASKS if tasks is None else tasks)
    quotas = _quotas({g: len(idx) for g, idx in groups.items()}, k)
    chosen = set()
    for g, idx in groups.items():
        idx = list(idx)
        rng.shuffle(idx)
        chosen.update(idx[: quotas[g]])
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [r for i, r in enumerate(records) if i in chosen]
    return train, val


def _strata(records: list[dict], tasks: Mapping[str, Task]) -> dict[tuple, list[int]]:
    """Indices grouped by (task, label) for single-label tasks; one group per task otherwise."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        task = tasks.get(r["task"])
        single = task is not None and task.kind in SINGLE_LABEL_KINDS
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
    from mentalglm.fileio.atomic import write_atomic

    return write_atomic(path, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
