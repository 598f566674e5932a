"""Weights & Biases: offline unless a key is set, one group per sweep, one run per stage, secrets masked."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Config keys whose values are credentials (matched as parts of the key, case-insensitively).
SECRET_KEY_PARTS = ("api_key", "apikey", "token", "secret", "password")
MASK = "***"


def wandb_offline() -> bool:
    """Offline unless WANDB_MODE=online, or a WANDB_API_KEY is set and WANDB_MODE does not say offline."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    return mode != "online" and not os.environ.get("WANDB_API_KEY")


def sweep_group(experiment_name: str, sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's runs: its experiment and its own directory, so two sweeps never mix."""
    return f"{experiment_name}-{Path(sweep_dir).name}"


def wandb_group(experiment_name: str) -> str:
    """The W&B group of a job: per sweep under `-m`, the experiment otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return sweep_group(experiment_name, hc.sweep.dir)
    return str(experiment_name)


def finish_loggers(loggers: list) -> None:
    """One W&B run per stage: finish it even on failure so the next job's run never merges into it."""
    for lg in loggers:
        if lg.__class__.__name__ == "WandbLogger":
            try:
                import wandb

                wandb.finish()
            except Exception as e:  # a logging failure must not hide the training error
                log.warning("wandb.finish failed: %s", e)


def environment_secrets() -> frozenset[str]:
    """Values of credential-like environment variables (at least 8 characters): masked wherever they appear."""
    return frozenset(
        v
        for k, v in os.environ.items()
        if len(v) >= 8 and any(p in k.lower() for p in ("key", "token", "secret", "password"))
    )


def is_secret_key(key: Any, extra: frozenset[str] = frozenset()) -> bool:
    name = str(key).lower()
    return name in extra or any(p in name for p in SECRET_KEY_PARTS)


def redact_secrets(obj, secrets: frozenset[str] | None = None, extra_keys: frozenset[str] = frozenset()):
    """`obj` (plain config data) with credential-like values masked: values of keys that look like credentials
    (or are listed in `extra_keys`), and any string holding a secret of the environment."""
    if secrets is None:
        secrets = environment_secrets()
    if isinstance(obj, dict):
        return {
            k: MASK if is_secret_key(k, extra_keys) and v not in (None, "") else redact_secrets(v, secrets, extra_keys)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v, secrets, extra_keys) for v in obj]
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return MASK
    return obj


def ablation_table(lines: list[dict], columns: list[tuple[str, str]]):
    import wandb

    cols = ["model", "variant", "seeds", "failed"] + [f"{name} {s}" for _, name in columns for s in ("mean", "std")]
    table = wandb.Table(columns=cols)
    for ln in lines:
        values = []
        for key, _ in columns:
            mean, std = ln[key] if ln[key] is not None else (None, None)
            values += [None if mean is None else round(mean, 2), None if std is None else round(std, 2)]
        table.add_data(ln["model"], ln["variant"], len(ln["seeds"]), len(ln["failed"]), *values)
    return table


def log_ablation(config, summary: dict, sweep_dir: Path, default_project: str = "mentalglm") -> None:
    """The sweep's ablation table as its own W&B run in the sweep's group (the table on disk is what matters)."""
    try:
        import wandb

        wcfg = config.logger.wandb or {}
        run = wandb.init(
            project=wcfg.get("project") or default_project,
            entity=wcfg.get("entity"),
            group=sweep_group(config.experiment_name, sweep_dir),
            job_type="ablation",
            name=f"ablation-{sweep_dir.name}",
            dir=str(sweep_dir),
            mode="offline" if wandb_offline() else "online",
            reinit="finish_previous",
        )
        run.log({"ablation": ablation_table(summary["lines"], summary["columns"])})
        run.finish()
    except Exception as e:
        log.warning("could not log the ablation table to W&B: %s", e)
