"""The stage registry: where a stage of one run finds the best adapter of an earlier stage of another.

Each entry records the identity of what produced the adapter: experiment, base model, LoRA settings, seed, the
stage's data (tasks, files, templates) and where the stage started. A later stage looks up the identity the
earlier stage would have under its own config, so runs of other experiments, data or LoRA targets never stand
in for each other; when only such runs exist, the error says how they differ and which command produces the
missing stage.

    <registry_dir>/<model>/seed<seed>/stage_<name>/<identity hash>.json
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mentalglm.config import to_dict
from mentalglm.errors import ConfigError
from mentalglm.fileio.atomic import write_json_atomic

DATA_KEYS = ("definition", "train", "val", "val_size", "format", "hub_splits", "pool", "val_fraction")


def stage_identity(cfg, stage_name: str, tasks: list[str], init: str) -> dict[str, Any]:
    """What decides the adapter a stage trains (see the module docstring)."""
    lora = to_dict(cfg.lora) if cfg.get("lora") is not None else None
    if lora and not isinstance(lora.get("target_modules"), str):
        lora["target_modules"] = sorted(lora["target_modules"])
    data = {
        t: {k: _plain(v) for k, v in to_dict(cfg.data.tasks[t]).items() if k in DATA_KEYS and v is not None}
        for t in tasks
    }
    templates = {t: v for t, v in to_dict(cfg.data.templates).items() if t in tasks}
    return {
        "experiment": str(cfg.experiment_name),
        "model": str(cfg.model.name),
        "pretrained": str(cfg.model.pretrained or cfg.model.name),
        "seed": int(cfg.seed),
        "stage": stage_name,
        "lora": lora,
        "data": data,
        "templates": templates,
        "init": init,
    }


def _plain(value):
    return str(Path(value).resolve()) if isinstance(value, str) and ("/" in value or "\\" in value) else value


def identity_hash(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def stage_dir(registry_dir: str | Path, model: str, seed: int, stage_name: str) -> Path:
    return Path(registry_dir) / model / f"seed{seed}" / f"stage_{stage_name}"


def entry_path(registry_dir: str | Path, identity: Mapping[str, Any]) -> Path:
    return (
        stage_dir(registry_dir, identity["model"], identity["seed"], identity["stage"])
        / f"{identity_hash(identity)}.json"
    )


def register(
    registry_dir: str | Path, identity: Mapping[str, Any], adapter: Path, run_dir: Path, best_score: float | None
) -> Path:
    return write_json_atomic(
        entry_path(registry_dir, identity),
        {
            "adapter": str(adapter.resolve()),
            "run_dir": str(run_dir.resolve()),
            "val_f1_mean": best_score,
            "identity": dict(identity),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


def lookup(registry_dir: str | Path, identity: Mapping[str, Any], command: str) -> dict:
    """The entry of exactly this identity, else a ConfigError naming how the registered ones differ."""
    path = entry_path(registry_dir, identity)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    folder = path.parent
    others = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    stage = identity["stage"]
    head = (
        f"no registered stage-{stage} adapter of model {identity['model']} (seed {identity['seed']}) matches "
        f"this run's stage {stage}"
    )
    if others:
        old = json.loads(others[0].read_text(encoding="utf-8")).get("identity", {})
        differ = [k for k in identity if old.get(k) != identity[k]]
        head += (
            f": the {len(others)} registered in {folder} differ in {', '.join(differ)} (the newest: {others[0].name})"
        )
    raise ConfigError(
        f"{head}. Produce it with `{command}`, point the stage at an adapter "
        f"(stages.<stage>.init=PATH), or start from the base model (init base, variant=s2)."
    )
