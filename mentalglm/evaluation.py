"""What evaluate.py runs: score a predictions file, or generate with a model (+ adapter) and score."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mentalglm.eval.outputs import write_evaluation
from mentalglm.models.loading import load_tokenizer
from mentalglm.pipeline import ConfigError, build_datamodule, build_loggers, build_module, finish_loggers

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
    loggers = build_loggers(cfg, f"{cfg.model.name}/evaluate/{cfg.split}", out_dir)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[], max_epochs=1)
    try:
        trainer.test(module, datamodule=dm, verbose=False)
        title = f"{cfg.model.name} on {cfg.split} ({'adapter ' + Path(adapter).name if adapter else f'{cfg.shots}-shot'})"
        gold = [{"task": r["task"], "labels": r["gold_labels"], "aspect": r.get("aspect") or ""}
                for r in module.test_predictions]
        return write_evaluation(module.test_predictions, module.test_results, out_dir, log_text=bool(cfg.log_text),
                                loggers=loggers, title=title, baseline=dm.majority_baseline(gold))
    finally:
        finish_loggers(loggers)
