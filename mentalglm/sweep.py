"""Hydra callback that turns a finished `train.py -m` sweep into the ablation table."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mentalglm.eval.ablation import COLUMNS, FAILED, rebuild_ablation
from mentalglm.eval.atomic import write_json_atomic

log = logging.getLogger(__name__)


def record_failure(job_dir: str | Path, error: BaseException) -> None:
    """Mark a sweep job as failed with its reason; the sweep goes on and the summary shows the cell as failed."""
    write_json_atomic(Path(job_dir) / FAILED, {"reason": f"{type(error).__name__}: {error}"})


class AblationCallback(Callback):
    def __init__(self, enabled: bool = True, wandb_project: str = "mentalglm"):
        self.enabled = enabled
        self.wandb_project = wandb_project

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled or config.get("task_name") != "train":
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        summary = rebuild_ablation(sweep_dir)
        self._log_wandb(config, summary, sweep_dir)
        if summary["failed"]:
            # Every other job has run and the table is written; the sweep still reports failure.
            raise SystemExit(f"{summary['failed']} of {summary['jobs']} sweep jobs failed; see {sweep_dir / 'ablation.md'}")

    def _log_wandb(self, config: DictConfig, summary: dict, sweep_dir: Path) -> None:
        if "wandb" not in (config.get("logger") or {}):
            return
        try:
            import wandb

            offline = not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "online"
            run = wandb.init(project=self.wandb_project, group=config.get("experiment_name"), job_type="ablation",
                             name="ablation", dir=str(sweep_dir), mode="offline" if offline else "online",
                             reinit="finish_previous")
            cols = ["model", "variant", "seeds"] + [name for _, name in COLUMNS]
            table = wandb.Table(columns=cols)
            for ln in summary["lines"]:
                table.add_data(ln["model"], ln["variant"], len(ln["seeds"]),
                               *[None if ln[k] is None else round(ln[k][0], 2) for k, _ in COLUMNS])
            run.log({"ablation": table})
            run.finish()
        except Exception as e:  # the table on disk is what matters; W&B is a mirror
            log.warning("could not log the ablation table to W&B: %s", e)
