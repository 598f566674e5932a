"""Sweeps (`train.py -m`): failed-job records, the W&B group of a sweep, and the Hydra callbacks that
make a multirun work and turn it into the ablation table when it ends."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from mentalglm.eval.ablation import COLUMNS, FAILED, job_dirs, job_failure, rebuild_ablation
from mentalglm.eval.atomic import write_json_atomic

log = logging.getLogger(__name__)


def record_failure(job_dir: str | Path, error: BaseException) -> None:
    """Mark a sweep job as failed with its reason; the sweep goes on and the summary shows the cell as failed."""
    write_json_atomic(Path(job_dir) / FAILED, {"reason": f"{type(error).__name__}: {error}",
                                               "log": str(Path(job_dir) / "train.log")})


def failed_jobs(sweep_dir: Path) -> list[tuple[str, str]]:
    """(job, reason) of every job of a sweep that recorded a failure."""
    failures = ((job.name, job_failure(job)) for job in job_dirs(sweep_dir))
    return [(name, reason) for name, reason in failures if reason is not None]


def sweep_group(experiment_name: str, sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's runs: its experiment and its own directory, so two sweeps never mix."""
    return f"{experiment_name}-{Path(sweep_dir).name}"


def wandb_group(cfg: DictConfig) -> str:
    """The W&B group of a job: per sweep under `-m`, the experiment otherwise."""
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return sweep_group(cfg.experiment_name, hc.sweep.dir)
    return str(cfg.experiment_name)


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
            raise SystemExit(f"{summary['failed']} of {summary['jobs']} sweep jobs failed; see {sweep_dir / 'ablation.md'}")

    def _log_wandb(self, config: DictConfig, summary: dict, sweep_dir: Path) -> None:
        if "wandb" not in (config.get("logger") or {}):
            return
        try:
            import wandb

            from mentalglm.pipeline import wandb_offline

            wcfg = config.logger.wandb or {}
            run = wandb.init(project=wcfg.get("project") or self.wandb_project, entity=wcfg.get("entity"), group=sweep_group(config.experiment_name, sweep_dir),
                             job_type="ablation", name=f"ablation-{sweep_dir.name}", dir=str(sweep_dir),
                             mode="offline" if wandb_offline() else "online", reinit="finish_previous")
            run.log({"ablation": ablation_table(summary["lines"])})
            run.finish()
        except Exception as e:  # the table on disk is what matters; W&B is a mirror
            log.warning("could not log the ablation table to W&B: %s", e)


def ablation_table(lines: list[dict]):
    import wandb

    cols = ["model", "variant", "seeds", "failed"] + [f"{name} {s}" for _, name in COLUMNS for s in ("mean", "std")]
    table = wandb.Table(columns=cols)
    for ln in lines:
        values = []
        for key, _ in COLUMNS:
            mean, std = ln[key] if ln[key] is not None else (None, None)
            values += [None if mean is None else round(mean, 2), None if std is None else round(std, 2)]
        table.add_data(ln["model"], ln["variant"], len(ln["seeds"]), len(ln["failed"]), *values)
    return table
