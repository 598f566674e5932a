"""What train.py runs: the stages of a variant, each a Lightning fit, then the C-IMHI test."""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mentalglm.data.datamodule import InstructionDataModule
from mentalglm.distributed import (adapter_state_dict, is_global_zero, load_adapter_weights,
                                   missing_strategy_package, resume_strategy_problem)
from mentalglm.errors import ConfigError  # noqa: F401  (re-exported: train.py and evaluate.py catch it)
from mentalglm.eval.atomic import write_json_atomic
from mentalglm.eval.metrics import mean_f1
from mentalglm.eval.outputs import write_evaluation
from mentalglm.models import packed_attention
from mentalglm.models.loading import load_tokenizer
from mentalglm.models.module import MentalGLMModule
from mentalglm.resume import mark_stage_done, stage_done, wants_resume
from mentalglm.validate import check_train_config

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    name: str
    best_adapter: Path
    best_score: float | None
    best_ckpt: str | None


# ----------------------------------------------------------------------------- planning
def plan_stages(cfg: DictConfig) -> list[DictConfig]:
    """The stage configs to run, in order: the variant's chain, or the single `stage`."""
    if cfg.get("variant") is None:
        return [cfg.stage]
    names = list(cfg.variant.stages)
    unknown = [n for n in names if n not in cfg.stages]
    if unknown:
        raise ConfigError(f"variant {cfg.variant.name} names unknown stage(s) {unknown}; known: {list(cfg.stages)}")
    return [cfg.stages[n] for n in names]


def registry_path(cfg: DictConfig, stage_name: str) -> Path:
    return Path(cfg.paths.registry_dir) / cfg.model.name / f"seed{cfg.seed}" / f"stage_{stage_name}.json"


def initial_adapter(cfg: DictConfig, stage: DictConfig, previous: StageResult | None) -> str | None:
    """Which adapter a stage starts from: the previous stage of this job, init_adapter, the registry, or none."""
    if stage.get("init_from") is None:
        return None
    if previous is not None:
        return str(previous.best_adapter)
    variant = cfg.get("variant")
    if variant is not None and variant.name == "s2":
        return None  # S2 ablation: stage two from the base model
    if cfg.get("init_adapter"):
        path = Path(cfg.init_adapter)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"init_adapter={path} is not a LoRA adapter directory (no adapter_config.json)")
        return str(path)
    entry = registry_path(cfg, stage.init_from)
    if not entry.is_file():
        raise ConfigError(
            f"stage {stage.name} continues the best stage-{stage.init_from} adapter of model {cfg.model.name} "
            f"(seed {cfg.seed}), but none was found at {entry}. Produce it with "
            f"`python train.py stage={stage.init_from} model={cfg.model.name} seed={cfg.seed}`, "
            f"pass init_adapter=PATH, or train from the base with variant=s2.")
    return json.loads(entry.read_text())["adapter"]


# ----------------------------------------------------------------------------- building blocks
def build_datamodule(cfg: DictConfig, tokenizer, tasks: list[str], out_dir: Path, splits=("train", "val", "test")):
    d = cfg.data
    return InstructionDataModule(
        tokenizer, list(tasks), OmegaConf.to_container(d.tasks, resolve=True), chat=bool(cfg.model.chat),
        max_length=int(d.max_length), batch_size=int(d.batch_size), eval_batch_size=int(d.eval_batch_size),
        batching=d.batching, bucket_batches=int(d.bucket_batches), num_workers=int(d.num_workers), seed=int(cfg.seed),
        on_error=d.on_error, templates=OmegaConf.to_container(d.templates, resolve=True),
        base_template=cfg.model.base_template, system=cfg.model.get("system"), cache_dir=Path(cfg.paths.cache_dir) / "datasets",
        split_file=out_dir / "split.json", limit_eval=d.get("limit_eval"), splits=tuple(splits))


def build_module(cfg: DictConfig, tokenizer, tasks: list[str], init_adapter: str | None) -> MentalGLMModule:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model.get("attn_implementation"):  # packed rows: attention per sample, not over the whole row
        model["attn_implementation"] = packed_attention.attention_for(cfg.data.batching, model["attn_implementation"])
    return MentalGLMModule(
        model=model,
        lora=OmegaConf.to_container(cfg.lora, resolve=True) if cfg.get("lora") is not None else None,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        generation=OmegaConf.to_container(cfg.generation, resolve=True), tasks=list(dict.fromkeys(tasks)),
        templates=OmegaConf.to_container(cfg.data.templates, resolve=True), init_adapter=init_adapter,
        merge_init_adapter=bool(cfg.get("merge_init_adapter", False)), cache_dir=str(cfg.paths.cache_dir),
        tokenizer=tokenizer, max_bad_steps=int(cfg.get("max_bad_steps", 20)))


def wandb_offline() -> bool:
    """Offline unless WANDB_MODE=online, or a WANDB_API_KEY is set and WANDB_MODE does not say offline."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    return mode != "online" and not os.environ.get("WANDB_API_KEY")


def build_loggers(cfg: DictConfig, run_name: str, out_dir: Path) -> list:
    loggers = []
    for key, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:
            continue
        if "_target_" not in lcfg:
            raise ConfigError(f"logger.{key} has no _target_ (a partial override of a logger the logger config "
                              f"does not define?): {OmegaConf.to_container(lcfg)}")
        kwargs: dict[str, Any] = {"save_dir": str(out_dir)}
        if "WandbLogger" in lcfg._target_:
            from mentalglm.sweep import wandb_group

            kwargs.update(name=run_name, group=wandb_group(cfg), job_type="train", reinit="finish_previous")
            if lcfg.get("offline") is None:
                kwargs["offline"] = wandb_offline()
        loggers.append(instantiate(lcfg, **kwargs))
    return loggers


def build_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list:
    callbacks = []
    for key, ccfg in (cfg.get("callbacks") or {}).items():
        if ccfg is None:
            continue
        if key == "progress_bar" and not cfg.trainer.get("enable_progress_bar", True):
            continue  # trainer.enable_progress_bar=false alone turns the bar off (Lightning refuses both)
        kwargs = {"dirpath": str(ckpt_dir)} if ccfg._target_.endswith("Checkpoint") else {}
        callbacks.append(instantiate(ccfg, **kwargs))
    return callbacks


def build_trainer(cfg: DictConfig, stage: DictConfig, loggers: list, callbacks: list) -> L.Trainer:
    check_strategy(cfg)
    return instantiate(cfg.trainer, max_epochs=int(stage.max_epochs), logger=loggers or False, callbacks=callbacks)


def check_strategy(cfg: DictConfig) -> None:
    problem = missing_strategy_package(OmegaConf.to_container(cfg.trainer, resolve=False))
    if problem:
        raise ConfigError(problem)


def finish_loggers(loggers: list) -> None:
    """One W&B run per stage: finish it even on failure so the next job's run never merges into it."""
    for lg in loggers:
        if lg.__class__.__name__ == "WandbLogger":
            try:
                import wandb

                wandb.finish()
            except Exception as e:  # a logging failure must not hide the training error
                log.warning("wandb.finish failed: %s", e)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_name(cfg: DictConfig, stage_name: str) -> str:
    variant = cfg.variant.name if cfg.get("variant") is not None else "single"
    return f"{cfg.model.name}/{variant}/stage_{stage_name}/seed{cfg.seed}"


# ----------------------------------------------------------------------------- stages
def run_stage(cfg: DictConfig, stage: DictConfig, init_adapter: str | None, tokenizer, out_dir: Path,
              test_tasks: list[str] | None) -> tuple[StageResult, dict | None]:
    stage_dir = out_dir / f"stage_{stage.name}"
    if wants_resume(cfg.get("resume"), cfg.get("ckpt_path")) and (done := stage_done(stage_dir)) is not None:
        log.info("stage %s finished before the interruption: reusing its adapter %s", stage.name, done["best_adapter"])
        return StageResult(stage.name, Path(done["best_adapter"]), done["best_score"], done["best_ckpt"]), done["test"]
    stage_dir.mkdir(parents=True, exist_ok=True)
    # Each stage's randomness depends on the seed alone, not on what earlier stages drew, so a resumed
    # run that skips a finished stage draws the same numbers as an uninterrupted one.
    L.seed_everything(int(cfg.seed), workers=True)
    tasks = list(stage.tasks)
    log.info("stage %s: tasks %s, %d epochs, init adapter %s", stage.name, tasks, stage.max_epochs, init_adapter)
    dm = build_datamodule(cfg, tokenizer, tasks, stage_dir, splits=("train", "val"))
    module = build_module(cfg, tokenizer, tasks + list(test_tasks or []), init_adapter)
    loggers = build_loggers(cfg, run_name(cfg, stage.name), stage_dir)
    callbacks = build_callbacks(cfg, stage_dir / "checkpoints")
    trainer = build_trainer(cfg, stage, loggers, callbacks)
    test_metrics = None
    try:
        for lg in loggers:
            lg.log_hyperparams(redact_secrets(OmegaConf.to_container(cfg, resolve=True)))
        # weights_only: a checkpoint is data (tensors, numbers, strings); it never unpickles arbitrary objects.
        ckpt_path = resume_checkpoint(cfg, stage_dir)
        if problem := resume_strategy_problem(OmegaConf.to_container(cfg.trainer), ckpt_path):
            raise ConfigError(problem)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        result = export_best(trainer, module, stage, stage_dir)
        if test_tasks:
            test_metrics = run_test(cfg, trainer, module, tokenizer, test_tasks, out_dir / "test", result.best_ckpt)
    finally:
        finish_loggers(loggers)
        # Callbacks and loggers can hold the module (bound methods, the trainer): drop them too, or the
        # model and optimizer survive this collection and share memory with the next job's.
        del trainer, module, dm, callbacks, loggers
        release_memory()
    if not is_global_zero():
        return result, test_metrics
    register(cfg, stage, result, out_dir)
    mark_stage_done(stage_dir, {"best_adapter": str(result.best_adapter), "best_score": result.best_score,
                                "best_ckpt": result.best_ckpt, "test": test_metrics})
    return result, test_metrics


def resume_checkpoint(cfg: DictConfig, stage_dir: Path) -> str | None:
    if cfg.get("ckpt_path") and cfg.ckpt_path != "last":
        return check_checkpoint(Path(cfg.ckpt_path))
    if cfg.get("resume") or cfg.get("ckpt_path") == "last":
        last = stage_dir / "checkpoints" / "last.ckpt"
        if last.exists():  # a directory under DeepSpeed
            log.info("resuming from %s", last)
            return check_checkpoint(last)
        log.info("resume: no checkpoint in %s, this stage starts from the beginning", last.parent)
    return None


def check_checkpoint(path: Path) -> str:
    """A readable checkpoint of plain data, else a one-line ConfigError (not an unpickling traceback from
    inside Lightning). Adapter-only checkpoints are small, so reading one twice costs little."""
    import pickle

    if path.is_dir():
        return str(path)  # a DeepSpeed checkpoint directory: its engine reads it
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"refusing to load {path}: it holds pickled objects beyond tensors and plain data, which "
                          f"could run code ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__}: {_first_line(e)}); resume "
                          "from another one or start without ckpt_path/resume") from None
    return str(path)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else ""


SECRET_KEY_PARTS = ("api_key", "apikey", "token", "secret", "password")


def redact_secrets(obj, secrets: frozenset[str] | None = None):
    """The config with credential-like values masked, before it goes to W&B (keys belong in the environment)."""
    if secrets is None:
        secrets = frozenset(v for k, v in os.environ.items()
                            if len(v) >= 8 and any(p in k.lower() for p in ("key", "token", "secret", "password")))
    if isinstance(obj, dict):
        return {k: "***" if any(p in str(k).lower() for p in SECRET_KEY_PARTS) and v
                else redact_secrets(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_secrets(v, secrets) for v in obj]
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return "***"
    return obj


def export_best(trainer: L.Trainer, module: MentalGLMModule, stage: DictConfig, stage_dir: Path) -> StageResult:
    """Load the best checkpoint's adapter weights and save them with save_pretrained (PeftModel-loadable)."""
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    score = float(ckpt_cb.best_model_score) if ckpt_cb is not None and ckpt_cb.best_model_score is not None else None
    # Every rank loads the best weights (each then tests its shard); rank 0 alone writes the adapter.
    if best and Path(best).is_dir():
        trainer.strategy.load_checkpoint(best)  # DeepSpeed: the engine loads its own (adapter-only) checkpoint
    elif best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        load_adapter_weights(module, state)
    adapter = adapter_state_dict(module.model, trainer.strategy)  # gathers sharded weights: every rank
    adapter_dir = stage_dir / "best_adapter"
    if trainer.is_global_zero:
        replace_dir_atomic(adapter_dir, lambda tmp: module.save_adapter(tmp, adapter))
    trainer.strategy.barrier("export_best")  # the next stage reads the adapter on every rank
    log.info("stage %s: best val/f1_mean %s, adapter -> %s", stage.name, score, adapter_dir)
    return StageResult(stage.name, adapter_dir, score, best or None)


def replace_dir_atomic(target: Path, write) -> None:
    """`write(tmp)` fills a temporary directory that then takes `target`'s place: a crash leaves the
    previous directory or the new one complete, never a half-written one under the final name."""
    import shutil

    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def register(cfg: DictConfig, stage: DictConfig, result: StageResult, out_dir: Path) -> None:
    write_json_atomic(registry_path(cfg, stage.name), {
        "adapter": str(result.best_adapter.resolve()), "run_dir": str(out_dir.resolve()),
        "val_f1_mean": result.best_score, "model": cfg.model.name, "seed": int(cfg.seed),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def run_test(cfg: DictConfig, trainer: L.Trainer, module: MentalGLMModule, tokenizer, tasks: list[str],
             out_dir: Path, best_ckpt: str | None) -> dict:
    dm = build_datamodule(cfg, tokenizer, tasks, out_dir, splits=("test",))
    # The module already holds the best adapter weights (export_best), so no checkpoint reload.
    trainer.test(module, datamodule=dm, ckpt_path=None, verbose=False)
    if not trainer.is_global_zero:
        results = module.test_results  # rank 0 writes the merged predictions
        return {**results, "f1_mean": mean_f1(results) if results else None}
    gold = [{"task": r["task"], "labels": r["gold_labels"], "aspect": r.get("aspect") or ""}
            for r in module.test_predictions]
    return write_evaluation(module.test_predictions, module.test_results, out_dir, log_text=bool(cfg.log_text),
                            loggers=trainer.loggers, baseline=dm.majority_baseline(gold))


def train(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    stages = plan_stages(cfg)
    check_train_config(cfg, stages)
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    previous: StageResult | None = None
    test_metrics: dict | None = None
    done: dict[str, dict] = {}
    for i, stage in enumerate(stages):
        init = initial_adapter(cfg, stage, previous)
        last = i == len(stages) - 1
        previous, test_metrics = run_stage(cfg, stage, init, tokenizer, out_dir,
                                           list(cfg.test_tasks) if (last and cfg.test) else None)
        done[stage.name] = {"init_adapter": init, "best_adapter": str(previous.best_adapter),
                            "best_val_f1_mean": previous.best_score, "best_checkpoint": previous.best_ckpt}
    summary = {"stages": done, "best_adapter": str(previous.best_adapter),
               "best_val_f1_mean": previous.best_score, "test": test_metrics}
    if is_global_zero():
        write_json_atomic(out_dir / "summary.json", summary)
    return summary
