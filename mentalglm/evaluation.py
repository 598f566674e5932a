"""What evaluate.py runs: score a predictions file, or generate with a model (+ adapter) and score."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mentalglm.eval.outputs import write_evaluation
from mentalglm.eval.partial import PartialPredictions, fingerprint, row_key
from mentalglm.models.loading import load_tokenizer
from mentalglm.pipeline import (ConfigError, build_datamodule, build_loggers, build_module, check_strategy,
                                finish_loggers)
from mentalglm.resume import wants_resume
from mentalglm.validate import check_evaluate_config

log = logging.getLogger(__name__)


def resolve_adapter(cfg: DictConfig) -> str | None:
    """adapter=PATH, or run_dir=PATH (the best adapter of the run's last stage), or None (no adapter)."""
    if cfg.get("adapter"):
        path = Path(cfg.adapter)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"adapter={path} is not a LoRA adapter directory (no adapter_config.json)")
        return str(path)
    if cfg.get("run_dir"):
        run = Path(cfg.run_dir)
        summary = run / "summary.json"
        if summary.is_file():
            return json.loads(summary.read_text())["best_adapter"]
        stages = sorted(run.glob("stage_*/best_adapter"))
        if not stages:
            raise ConfigError(f"run_dir={run} holds no stage_*/best_adapter: is it a finished train.py run directory?")
        return str(stages[-1])
    return None


def evaluate(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.output_dir)
    if cfg.get("report") == "ablation":
        from mentalglm.eval.ablation import rebuild_ablation

        return rebuild_ablation(cfg.sweep_dir)
    if cfg.get("report"):
        raise ConfigError(f"report={cfg.report!r} is unknown; the only report is `ablation`")
    if cfg.get("predictions"):
        from mentalglm.eval.scoring import score_predictions_file

        return score_predictions_file(cfg.predictions, out_dir)
    return evaluate_model(cfg, out_dir)


def evaluate_model(cfg: DictConfig, out_dir: Path) -> dict:
    check_evaluate_config(cfg)
    adapter = resolve_adapter(cfg)
    if adapter is None:
        log.info("no adapter: evaluating the base model %s with %d-shot prompts", cfg.model.name, cfg.shots)
        cfg = OmegaConf.merge(cfg, {"lora": None})
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    tasks = list(cfg.tasks)
    splits = (cfg.split,) + (("train",) if cfg.shots else ())
    dm = build_datamodule(cfg, tokenizer, tasks, out_dir, splits=splits)
    dm.test_split, dm.shots = cfg.split, int(cfg.shots)
    module = build_module(cfg, tokenizer, tasks, adapter)
    module.keep_inputs = bool(cfg.save_inputs)
    progress = PartialPredictions(out_dir, fingerprint(prediction_settings(cfg, tasks), adapter))
    done = progress.start(resume=wants_resume(cfg.get("resume")))
    order = skip_done(dm, cfg.split, done)
    loggers = build_loggers(cfg, f"{cfg.model.name}/evaluate/{cfg.split}", out_dir)
    check_strategy(cfg)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[progress], max_epochs=1)
    try:
        if len(dm.datasets[cfg.split]):
            trainer.test(module, datamodule=dm, verbose=False)
        rows, results = module.test_predictions, getattr(module, "test_results", {})
        if done:
            rows = sorted(done + rows, key=lambda r: order[row_key(r)])
            for r in rows:
                r["index"] = order[row_key(r)]
            results = metrics_from_rows(module.tasks, rows)
        if not trainer.is_global_zero:
            return results  # every rank holds all rows and metrics; rank 0 alone writes them
        title = f"{cfg.model.name} on {cfg.split} ({'adapter ' + Path(adapter).name if adapter else f'{cfg.shots}-shot'})"
        gold = [{"task": r["task"], "labels": r["gold_labels"], "aspect": r.get("aspect") or ""} for r in rows]
        metrics = write_evaluation(rows, results, out_dir, log_text=bool(cfg.log_text), loggers=loggers, title=title,
                                   baseline=dm.majority_baseline(gold))
        progress.finish()
        return metrics
    finally:
        finish_loggers(loggers)


def prediction_settings(cfg: DictConfig, tasks: list[str]) -> dict:
    """The settings that decide what the model answers (see PartialPredictions)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {**{k: cfg.get(k) for k in ("split", "shots", "save_inputs", "seed")}, "tasks": tasks,
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "generation": OmegaConf.to_container(cfg.generation, resolve=True),
            "data": {k: data.get(k) for k in ("max_length", "limit_eval", "templates")},
            "files": {t: data["tasks"][t] for t in tasks}}


def skip_done(dm, split: str, done: list[dict]) -> dict[tuple, int]:
    """Leave out of the test split the items predicted before an interruption; return each item's position
    in the full split (the order predictions.jsonl keeps)."""
    dm.setup("test")
    ds = dm.datasets[split]
    keys = [row_key(r) for r in ds.select_columns(["task", "id", "aspect"])]
    finished = {row_key(r) for r in done}
    keep = [i for i, k in enumerate(keys) if k not in finished]
    if done:
        log.info("resuming: %d of %d items already predicted, generating the other %d", len(keys) - len(keep),
                 len(keys), len(keep))
        dm.datasets[split] = ds.select(keep)
    return {k: i for i, k in enumerate(keys)}


def metrics_from_rows(tasks: dict, rows: list[dict]) -> dict[str, dict]:
    """The module's test metrics, computed from prediction rows (those of both sessions of a resumed run)."""
    from mentalglm.eval.metrics import TaskMetrics

    results: dict[str, dict] = {}
    for name, task in tasks.items():
        mine = [r for r in rows if r["task"] == name]
        metric = TaskMetrics(task, sync_on_compute=False)  # every rank holds all rows: no cross-rank sum
        if mine:
            metric.update([r["pred_labels"] for r in mine], [r["gold_labels"] for r in mine],
                          [r["parsed"] for r in mine], [r["aspect"] for r in mine])
        results.update(metric.compute())
    return results
