"""Calibrated risk scores at the end of a test: a likelihood pass over the validation split fits the
calibration (mentalglm/scoring/calibration.py) that the test rows' label likelihoods are then put through."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from mentalglm.models.module import MentalGLMModule
from mentalglm.runtime.builders import build_datamodule, tasks_with_split
from mentalglm.scoring.calibration import calibrate_rows
from mentalglm.tasks import Task

log = logging.getLogger(__name__)


def validation_scores(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: MentalGLMModule,
    tokenizer,
    tasks: dict[str, Task],
    names: list[str],
    out_dir: Path,
    shots: int = 0,
    describe: bool | None = None,
) -> list[dict]:
    """Label likelihoods of every validation item of the tasks in `names` that have a validation split (no
    generation, nothing logged): what the calibration is fitted on."""
    with_val = tasks_with_split(cfg, names, "val")
    if not with_val:
        return []
    datamodule = build_datamodule(
        cfg, tokenizer, tasks, with_val, out_dir, splits=("val",), shots=shots, describe=describe, save_split=False
    )
    module.collect_scores = True
    try:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        module.collect_scores = False
    return module.val_score_rows


def calibrated(
    cfg: DictConfig, val_rows: list[dict], test_rows: list[dict], tasks: dict[str, Task]
) -> tuple[list[dict], dict, dict]:
    """(test rows with `calibrated_scores`, the report per task, the calibration per task)."""
    s = cfg.scores
    rows, report, calibrations = calibrate_rows(
        val_rows,
        test_rows,
        tasks,
        method=s.calibration,
        sensitivity=float(s.sensitivity),
        ks=[int(k) for k in s.precision_at_k],
        bins=int(s.bins),
    )
    uncalibrated = [n for n, c in calibrations.items() if c.method == "none" and s.calibration != "none"]
    if uncalibrated:
        log.warning("no validation items for %s: their risk scores are not calibrated", ", ".join(uncalibrated))
    return rows, report, calibrations
