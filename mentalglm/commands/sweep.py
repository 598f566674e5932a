"""Sweeps (`train.py -m`): failed-job records and the Hydra callbacks that make a multirun work and turn it
into the ablation table when it ends."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mentalglm.fileio.atomic import write_json_atomic
from mentalglm.reporting.ablation import FAILED, job_dirs, job_failure, rebuild_ablation

log = logging.getLogger(__name__)


def record_failure(job_dir: str | Path, error: BaseException) -> None:
    """Mark a sweep job as failed with its reason; the sweep goes on and the summary shows the cell as failed."""
    write_json_atomic(
        Path(job_dir) / FAILED, {"reason": f"{type(error).__name__}: {error}", "log": str(Path(job_dir) / "train.log")}
    )


def failed_jobs(sweep_dir: Path) -> list[tuple[str, str]]:
    """(job, reason) of every job of a sweep that recorded a failure."""
    failures = ((job.name, job_failure(job)) for job in job_dirs(sweep_dir))
    return [(name, reason) for name, reason in failures if reason is not None]


class ControllerHydraConfig(Callback):
    """Make `${hydra:...}` resolvable while the sweeper sets up (as hydra PR #3439 does upstream).

    Hydra 1.3 installs HydraConfig only when a job starts, yet the sweeper resolves hydra.sweep.dir
    first, and ours goes through paths.root_dir = ${hydra:runtime.cwd}: without this, `-m` fails with
    "HydraConfig was not set". A copy is installed so the controller's own config stays writable.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not HydraConfig.initialized():
            HydraConfig.instance().set_config(copy.deepcopy(config))


class AblationCallback(Callback):
    """At the end of `train.py -m`: ablation.md/.csv/.png (and a W&B table) in the sweep directory; the
    sweep exits non-zero when a job failed. Disabled (hyper-parameter search), it only lists failures."""

    def __init__(self, enabled: bool = True, wandb_project: str = "mentalglm"):
        self.enabled = enabled
        self.wandb_project = wandb_project

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("task_name") != "train":
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        if not self.enabled:
            for job, reason in failed_jobs(sweep_dir):
                log.warning("job %s failed: %s", job, reason)
            return
        failures = failed_jobs(sweep_dir)
        if config.get("test") is False and not failures:
            log.info("test=false: no ablation table for %s", sweep_dir)
            return
        summary = rebuild_ablation(sweep_dir)
        self._log_wandb(config, summary, sweep_dir)
        if summary["failed"]:
            # Every other job has run and the table is written; the sweep still reports failure.
            raise SystemExit(
                f"{summary['failed']} of {summary['jobs']} sweep jobs failed; see {sweep_dir / 'ablation.md'}"
            )

    def _log_wandb(self, config: DictConfig, summary: dict, sweep_dir: Path) -> None:
        if "wandb" in (config.get("logger") or {}):
            from mentalglm.tracking import log_ablation

            log_ablation(config, summary, sweep_dir, self.wandb_project)
