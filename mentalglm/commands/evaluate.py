"""What evaluate.py runs: score a predictions file, or generate with a model (+ adapter) and score."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mentalglm.checks import check_evaluate_config
from mentalglm.data.datamodule import item_key
from mentalglm.errors import ConfigError
from mentalglm.fileio.partial import PartialPredictions, fingerprint
from mentalglm.models.loading import check_adapter_dir, load_tokenizer
from mentalglm.models.module import ROW_FIELDS
from mentalglm.reporting.writer import score_predictions_file, write_evaluation
from mentalglm.runtime.builders import (
    build_datamodule,
    build_loggers,
    build_module,
    build_tasks,
    build_trainer,
    selected_tasks,
)
from mentalglm.runtime.resume import wants_resume
from mentalglm.scoring.score import score
from mentalglm.tasks import TASKS, Task
from mentalglm.tracking import finish_loggers

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    from mentalglm.cli import log_user_error, single_console_logging
    from mentalglm.errors import UserError

    single_console_logging()
    try:
        return evaluate(cfg)
    except UserError as e:
        log_user_error(e)  # the traceback into evaluate.log; the console gets one `error:` line
        raise


def resolve_adapter(cfg: DictConfig) -> str | None:
    """adapter=PATH, or run_dir=PATH (the best adapter of the run's last stage), or None (no adapter)."""
    if cfg.get("adapter"):
        return str(check_adapter_dir(cfg.adapter, "adapter"))
    if cfg.get("run_dir"):
        run = Path(cfg.run_dir)
        summary = run / "summary.json"
        if summary.is_file():
            return str(check_adapter_dir(json.loads(summary.read_text())["best_adapter"], "run_dir's best adapter"))
        stages = sorted(run.glob("stage_*/best_adapter"))
        if not stages:
            raise ConfigError(f"run_dir={run} holds no stage_*/best_adapter: is it a finished train.py run directory?")
        return str(stages[-1])
    return None


def evaluate(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.output_dir)
    if cfg.get("report") == "ablation":
        from mentalglm.reporting.ablation import rebuild_ablation

        if not cfg.get("sweep_dir"):
            raise ConfigError("report=ablation needs sweep_dir=PATH (a train.py -m sweep directory)")
        return rebuild_ablation(cfg.sweep_dir)
    if cfg.get("report"):
        raise ConfigError(f"report={cfg.report!r} is unknown; the only report is `ablation`")
    tasks = build_tasks(cfg)
    if cfg.get("predictions"):
        return score_predictions_file(
            cfg.predictions,
            out_dir,
            scoring_tasks(tasks),
            templates=OmegaConf.to_container(cfg.data.templates, resolve=True),
        )
    return evaluate_model(cfg, out_dir, tasks)


def scoring_tasks(tasks: dict[str, Task]) -> dict[str, Task]:
    """What a predictions file's rows may name: the data config's tasks, then every other built-in task."""
    return {**tasks, **{n: t for n, t in TASKS.items() if n not in tasks}}


def eval_task_names(cfg: DictConfig, selected: list[str], split: str) -> list[str]:
    """The selected tasks that have `split`: a file, or for val a carved or pooled validation split."""

    def has(name: str) -> bool:
        spec = cfg.data.tasks[name]
        if split == "val":
            return bool(spec.get("val") or spec.get("val_size") or spec.get("pool"))
        return bool(spec.get(split))

    return [t for t in selected if has(t)]


def evaluate_model(cfg: DictConfig, out_dir: Path, tasks: dict[str, Task]) -> dict:
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split={cfg.split} is not one of test, val")
    names = eval_task_names(cfg, selected_tasks(cfg, tasks), cfg.split)
    check_evaluate_config(cfg, names)
    adapter = resolve_adapter(cfg)
    if adapter is None:
        log.info("no adapter: evaluating the base model %s with %d-shot prompts", cfg.model.name, cfg.shots)
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    progress = PartialPredictions(out_dir, fingerprint(prediction_settings(cfg, names), adapter))
    done = progress.start(resume=wants_resume(cfg.get("resume")))
    splits = (cfg.split,) + (("train",) if cfg.shots else ())
    dm = build_datamodule(
        cfg,
        tokenizer,
        tasks,
        names,
        out_dir,
        splits=splits,
        test_split=cfg.split,
        shots=int(cfg.shots),
        skip={item_key(r) for r in done},
    )
    dm.setup("test")
    if done:
        total = len(dm.item_index.get(cfg.split, {}))
        log.info(
            "resuming: %d of %d items already predicted, generating the other %d", len(done), total, total - len(done)
        )
    eval_tasks = {n: tasks[n] for n in names}
    module = build_module(cfg, tokenizer, eval_tasks, adapter, train=False, keep_inputs=bool(cfg.save_inputs))
    loggers = build_loggers(cfg, f"{cfg.model.name}/evaluate/{cfg.split}", out_dir, job_type="evaluate")
    trainer = build_trainer(cfg, loggers, [progress])
    try:
        if cfg.split in dm.datasets:
            trainer.test(module, datamodule=dm, verbose=False)
        # Rows written before an interruption and rows of this session, scored together by the one scoring path.
        rows, results = score(
            [{k: r[k] for k in (*ROW_FIELDS, "query") if k in r} for r in done + module.test_predictions], eval_tasks
        )
        if not trainer.is_global_zero:
            return results  # every rank holds all rows and metrics; rank 0 alone writes them
        title = (
            f"{cfg.model.name} on {cfg.split} ({'adapter ' + Path(adapter).name if adapter else f'{cfg.shots}-shot'})"
        )
        gold = [{"task": r["task"], "labels": r["gold_labels"], "aspect": r.get("aspect") or ""} for r in rows]
        metrics = write_evaluation(
            rows,
            results,
            out_dir,
            eval_tasks,
            log_text=bool(cfg.log_text),
            loggers=loggers,
            title=title,
            baseline=dm.majority_baseline(gold),
            templates=OmegaConf.to_container(cfg.data.templates, resolve=True),
        )
        progress.finish()
        return metrics
    finally:
        finish_loggers(loggers)


def prediction_settings(cfg: DictConfig, tasks: list[str]) -> dict:
    """The settings that decide what the model answers (see PartialPredictions)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {
        **{k: cfg.get(k) for k in ("split", "shots", "save_inputs", "seed")},
        "tasks": tasks,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "data": {k: data.get(k) for k in ("max_length", "limit_eval", "templates")},
        "files": {t: data["tasks"][t] for t in tasks},
    }
