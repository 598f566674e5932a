"""The one set of builders every entry point uses: tasks, datamodule, module, loggers, callbacks, trainer.

Each maps a composed config (conf/, schema mentalglm/config.py) to one constructor; nothing is set on the built
objects afterwards.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mentalglm.config import (
    DataConfig,
    GenerationConfig,
    LoraConfig,
    ModelConfig,
    OptimizerConfig,
    as_config,
    task_entries,
    to_dict,
)
from mentalglm.errors import ConfigError
from mentalglm.tasks import Task, resolve_tasks

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch and Lightning load only where a model is built: build_data.py needs neither
    import lightning as L

    from mentalglm.data.datamodule import InstructionDataModule
    from mentalglm.models.module import MentalGLMModule


def _typed(schema, node):
    """A composed config node as its schema's dataclass (composition has already checked it)."""
    if isinstance(node, DictConfig) and OmegaConf.get_type(node) is schema:
        return OmegaConf.to_object(node)
    return as_config(schema, node)


# ----------------------------------------------------------------------------- tasks
def build_tasks(cfg: DictConfig) -> dict[str, Task]:
    """Every task of the data config (data.tasks, in its order, entries checked), with data.templates applied."""
    entries = {
        name: to_dict(entry) for name, entry in task_entries(OmegaConf.to_container(cfg.data, resolve=True)).items()
    }
    return resolve_tasks(entries, OmegaConf.to_container(cfg.data.templates, resolve=True))


def selected_tasks(cfg: DictConfig, tasks: dict[str, Task]) -> list[str]:
    """data.select (in its order), or every task of the data config; unknown names are an error."""
    select = cfg.data.get("select")
    if select is None:
        return list(tasks)
    unknown = [t for t in select if t not in tasks]
    if unknown:
        known = ", ".join(tasks)
        raise ConfigError(
            f"unknown task {unknown[0]!r} in data.select; known tasks: {known} (a new task needs "
            f"data.tasks.{unknown[0]} with its files and, unless it is built in, a definition)"
        )
    return list(dict.fromkeys(select))  # in the order given: the order of every report


def stage_names(entry) -> list[str]:
    stage = entry.get("stage") if entry is not None else None
    if stage is None:
        return []
    return [str(stage)] if isinstance(stage, (str, int)) else [str(s) for s in stage]


def trainable(entry) -> bool:
    """A training file, or splits pooled into train and val."""
    return bool(entry.get("train") or entry.get("pool"))


def pooled_test(entry) -> bool:
    return "test" in (entry.get("pool") or [])


def test_only(entry) -> bool:
    """Only a test file (IMHI tasks MentaLLaMA released as test sets): a stage leaves it out unless pooled. An
    entry that names a validation split but lost its training file is a mistake, reported by the config check."""
    return not trainable(entry) and not (entry.get("val") or entry.get("val_size"))


_LEFT_OUT: set[tuple[str, str]] = set()


def stage_tasks(cfg: DictConfig, selected: list[str], stage: str) -> list[str]:
    """The selected tasks a stage trains on: their data entry names the stage and has training data (IMHI
    tasks MentaLLaMA released only as test sets have none until data.pool pools them)."""
    named = [t for t in selected if stage in stage_names(cfg.data.tasks[t])]
    left_out = [t for t in named if test_only(cfg.data.tasks[t]) and (stage, t) not in _LEFT_OUT]
    if left_out:
        _LEFT_OUT.update((stage, t) for t in left_out)
        log.info(
            "stage %s leaves out %s: no training file (released only as test sets); data.pool=[train,val,test] "
            "data.val_fraction=0.1 pools and re-splits them as the paper's Table 1 did",
            stage,
            ", ".join(left_out),
        )
    return [t for t in named if not test_only(cfg.data.tasks[t])]


def test_tasks(cfg: DictConfig, selected: list[str]) -> list[str]:
    """The selected tasks with a test file: what a run is tested on after its last stage (not a test set that
    data.pool made training data, nor one of a stage task the run cannot train on)."""

    def tested(entry) -> bool:
        untrained_stage_task = bool(stage_names(entry)) and test_only(entry)
        return bool(entry.get("test")) and not pooled_test(entry) and not untrained_stage_task

    return [t for t in selected if tested(cfg.data.tasks[t])]


def tasks_with_split(cfg: DictConfig, selected: list[str], split: str) -> list[str]:
    """The selected tasks that have `split`: a file, or for val a carved or pooled validation split."""

    def has(name: str) -> bool:
        spec = cfg.data.tasks[name]
        if split == "val":
            return bool(spec.get("val") or spec.get("val_size") or spec.get("pool"))
        if split == "test" and pooled_test(spec):
            return False  # pooled into train and val
        return bool(spec.get(split))

    return [t for t in selected if has(t)]


def load_splits(cfg: DictConfig, tasks: dict[str, Task], names: list[str]) -> dict[str, list[dict]]:
    """The records of every split of the tasks in `names`, as training splits them (no tokenizer, no model)."""
    from mentalglm.data.splits import build_splits

    entries = task_entries(OmegaConf.to_container(cfg.data, resolve=True))
    chosen = {n: to_dict(entries[n]) for n in names}
    for spec in chosen.values():
        spec.pop("definition", None), spec.pop("stage", None)
    return build_splits(
        chosen,
        seed=cfg.seed,
        on_error=cfg.data.on_error,
        templates=OmegaConf.to_container(cfg.data.templates, resolve=True),
        tasks=tasks,
        on_leak=cfg.data.on_leak,
    )


# ----------------------------------------------------------------------------- data and model
def resolve_adapter(cfg: DictConfig) -> str | None:
    """adapter=PATH, or run_dir=PATH (the best adapter of the run's last stage), or None (no adapter)."""
    if cfg.get("adapter"):
        from mentalglm.models.loading import check_adapter_dir

        return str(check_adapter_dir(cfg.adapter, "adapter"))
    if cfg.get("run_dir"):
        run = Path(cfg.run_dir)
        summary = run / "summary.json"
        if summary.is_file():
            from mentalglm.models.loading import check_adapter_dir

            return str(check_adapter_dir(json.loads(summary.read_text())["best_adapter"], "run_dir's best adapter"))
        stages = sorted(run.glob("stage_*/best_adapter"))
        if not stages:
            raise ConfigError(f"run_dir={run} holds no stage_*/best_adapter: is it a finished train.py run directory?")
        return str(stages[-1])
    return None


def resolve_calibration(cfg: DictConfig) -> str | None:
    """The calibration predict/serve apply: scores.calibration_file, else the one a run's test wrote."""
    if cfg.scores.get("calibration_file"):
        return str(cfg.scores.calibration_file)
    if cfg.get("run_dir") and (found := Path(cfg.run_dir) / "test" / "calibration.json").is_file():
        return str(found)
    return None


def build_predictor(cfg: DictConfig, tasks: dict[str, Task], adapter: str | None, *, load: bool):
    """The `Predictor` of predict.py and serve.py; `load=False` (a vLLM backend) leaves the model out of this
    process, which label likelihoods (scores.enabled) need."""
    from mentalglm.serving.predictor import Predictor

    scores = bool(cfg.scores.enabled)
    if scores and not load:
        raise ConfigError("scores.enabled=true needs the hf backend (label likelihoods come from the model's forward)")
    return Predictor(
        _typed(ModelConfig, cfg.model),
        tasks,
        adapter,
        cache_dir=cfg.paths.cache_dir,
        data=_typed(DataConfig, cfg.data),
        generation=_typed(GenerationConfig, cfg.generation),
        load=load,
        scores=scores,
        calibration_file=resolve_calibration(cfg) if scores else None,
    )


def build_datamodule(
    cfg: DictConfig,
    tokenizer,
    tasks: dict[str, Task],
    names: list[str],
    out_dir: Path,
    splits=("train", "val", "test"),
    *,
    test_split: str = "test",
    shots: int = 0,
    describe: bool | None = None,
    skip: Collection[tuple[str, str, str]] = (),
    save_split: bool = True,
) -> InstructionDataModule:
    """`describe`: the task description before each query; None: data.task_description (false when null)."""
    model = cfg.model
    from mentalglm.data.datamodule import InstructionDataModule

    return InstructionDataModule(
        tokenizer,
        {n: tasks[n] for n in names},
        _typed(DataConfig, cfg.data),
        chat=bool(model.chat),
        seed=int(cfg.seed),
        base_template=model.base_template,
        system=model.get("system"),
        cache_dir=Path(cfg.paths.cache_dir) / "datasets",
        split_file=out_dir / "split.json" if save_split else None,
        splits=tuple(splits),
        test_split=test_split,
        shots=shots,
        describe=bool(cfg.data.get("task_description")) if describe is None else describe,
        val_max_pad_fraction=cfg.generation.val_max_pad_fraction,
        skip=skip,
    )


def build_module(
    cfg: DictConfig,
    tokenizer,
    tasks: dict[str, Task],
    init_adapter: str | None,
    *,
    merge_init: bool = False,
    train: bool = True,
    keep_inputs: bool = False,
) -> MentalGLMModule:
    """`train=False`: the adapter (if any) is loaded as it was trained, for generation only."""
    model = _typed(ModelConfig, cfg.model)
    # Packed rows: attention per sample, not over the whole row.
    from mentalglm.models import packed_attention
    from mentalglm.models.module import MentalGLMModule

    model.attn_implementation = packed_attention.attention_for(cfg.data.batching, model.attn_implementation)
    lora = _typed(LoraConfig, cfg.lora) if train and cfg.get("lora") is not None else None
    return MentalGLMModule(
        model=model,
        lora=lora,
        optimizer=_typed(OptimizerConfig, cfg.optimizer),
        generation=_typed(GenerationConfig, cfg.generation),
        tasks=tasks,
        tokenizer=tokenizer,
        init_adapter=init_adapter,
        merge_init_adapter=merge_init,
        cache_dir=str(cfg.paths.cache_dir),
        max_bad_steps=int(cfg.get("max_bad_steps", 20)),
        keep_inputs=keep_inputs,
        scores=bool(cfg.scores.enabled),
        validation_mode=str(OmegaConf.select(cfg, "validation.mode", default="generate")),
    )


# ----------------------------------------------------------------------------- Lightning
def build_loggers(cfg: DictConfig, run_name: str, out_dir: Path, job_type: str = "train") -> list:
    from mentalglm.tracking import wandb_group, wandb_offline

    loggers = []
    for key, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:
            continue
        if "_target_" not in lcfg:
            raise ConfigError(
                f"logger.{key} has no _target_ (a partial override of a logger the logger config "
                f"does not define?): {OmegaConf.to_container(lcfg)}"
            )
        kwargs: dict[str, Any] = {"save_dir": str(out_dir)}
        if "WandbLogger" in lcfg._target_:
            kwargs.update(
                name=run_name, group=wandb_group(cfg.experiment_name), job_type=job_type, reinit="finish_previous"
            )
            if lcfg.get("offline") is None:
                kwargs["offline"] = wandb_offline()
        loggers.append(instantiate(lcfg, **kwargs))
    return loggers


def build_callbacks(cfg: DictConfig, ckpt_dir: Path | None, extra: list | None = None) -> list:
    """The configured callbacks (checkpoints into `ckpt_dir`; none when it is None), then `extra`."""
    callbacks = []
    for key, ccfg in (cfg.get("callbacks") or {}).items():
        if ccfg is None:
            continue
        if key == "progress_bar" and not cfg.trainer.get("enable_progress_bar", True):
            continue  # trainer.enable_progress_bar=false alone turns the bar off (Lightning refuses both)
        is_checkpoint = ccfg._target_.endswith("Checkpoint")
        if is_checkpoint and ckpt_dir is None:
            continue
        callbacks.append(instantiate(ccfg, **({"dirpath": str(ckpt_dir)} if is_checkpoint else {})))
    return callbacks + list(extra or [])


def build_trainer(cfg: DictConfig, loggers: list, callbacks: list, max_epochs: int = 1, **overrides) -> L.Trainer:
    """cfg.trainer with the run's loggers, callbacks and epochs (`overrides`: further Trainer arguments)."""
    from mentalglm.runtime.distributed import missing_strategy_package

    problem = missing_strategy_package(OmegaConf.to_container(cfg.trainer, resolve=False))
    if problem:
        raise ConfigError(problem)
    if "deepspeed" not in str(cfg.trainer.get("strategy", "")) and not cfg.trainer.get("plugins"):
        from mentalglm.runtime.callbacks import AtomicCheckpointIO

        overrides.setdefault("plugins", [AtomicCheckpointIO()])  # DeepSpeed writes its own checkpoint directories
    return instantiate(
        cfg.trainer, max_epochs=int(max_epochs), logger=loggers or False, callbacks=callbacks, **overrides
    )
