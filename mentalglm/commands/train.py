"""What train.py runs: the stages of the chain, each a Lightning fit, then the test of the last stage's best adapter."""

from __future__ import annotations

import gc
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mentalglm.checks import check_train_config
from mentalglm.commands.scores import calibrated, validation_scores
from mentalglm.errors import CheckpointError, ConfigError
from mentalglm.fileio.atomic import replace_dir_atomic, write_atomic, write_json_atomic
from mentalglm.models.loading import check_adapter_dir, load_tokenizer
from mentalglm.models.module import MentalGLMModule
from mentalglm.reporting.writer import write_evaluation
from mentalglm.runtime import registry
from mentalglm.runtime.builders import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_module,
    build_tasks,
    build_trainer,
    selected_tasks,
    stage_tasks,
    test_tasks,
)
from mentalglm.runtime.distributed import (
    adapter_state_dict,
    is_global_zero,
    load_adapter_weights,
    resume_strategy_problem,
)
from mentalglm.runtime.resume import mark_stage_done, stage_done, wants_resume
from mentalglm.runtime.run_card import data_source, model_card, read_card, run_card, write_card
from mentalglm.scoring.metrics import mean_f1
from mentalglm.scoring.text_metrics import explanation_report
from mentalglm.tasks import Task
from mentalglm.tracking import finish_loggers, loggable_config

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    name: str
    best_adapter: Path
    best_score: float | None
    best_ckpt: str | None
    identity: dict


@dataclass
class Plan:
    """What a run trains: each stage of the chain with its tasks and where its adapter starts."""

    name: str
    tasks: list[str]
    max_epochs: int
    init: str
    merge_init: bool


# ----------------------------------------------------------------------------- planning
def chain_name(cfg: DictConfig) -> str:
    from mentalglm.reporting.ablation import chain_name as name

    return name(cfg)


def plan_stages(cfg: DictConfig, tasks: dict[str, Task] | None = None) -> list[Plan]:
    """The stages of `chain`, in order, each with the selected tasks that name it."""
    tasks = build_tasks(cfg) if tasks is None else tasks
    selected = selected_tasks(cfg, tasks)
    plans = []
    for name in cfg.chain:
        if name not in cfg.stages:
            raise ConfigError(f"chain names unknown stage {name!r}; stages: {', '.join(cfg.stages)}")
        stage = cfg.stages[name]
        plans.append(
            Plan(
                str(name),
                stage_tasks(cfg, selected, str(name)),
                int(stage.max_epochs),
                str(stage.init),
                bool(stage.merge_init),
            )
        )
    return plans


def registry_command(cfg: DictConfig, stage: str) -> str:
    return (
        f"python train.py stage={stage} model={cfg.model.name} seed={cfg.seed} (with this run's experiment, "
        "data and lora settings)"
    )


def initial_adapter(
    cfg: DictConfig, plan: Plan, done: dict[str, StageResult], selected: list[str]
) -> tuple[str | None, str]:
    """(the adapter a stage starts from, how it starts, for its identity): the base model, an earlier stage of
    this run, the registered best adapter of an earlier stage with this run's identity, or an adapter directory."""
    init = plan.init
    if init == "base":
        return None, "base"
    if init in done:
        return str(done[init].best_adapter), f"stage {init}"
    if init in cfg.stages:
        earlier = plan_for(cfg, init, selected)
        start = "base" if earlier.init == "base" else f"stage {earlier.init}"
        identity = registry.stage_identity(cfg, init, earlier.tasks, start)
        entry = registry.lookup(cfg.paths.registry_dir, identity, registry_command(cfg, init))
        return check_adapter(entry["adapter"], f"registry entry of stage {init}"), f"stage {init}"
    return check_adapter(init, f"stages.{plan.name}.init"), f"adapter {Path(init).resolve()}"


def plan_for(cfg: DictConfig, name: str, selected: list[str]) -> Plan:
    stage = cfg.stages[name]
    return Plan(name, stage_tasks(cfg, selected, name), int(stage.max_epochs), str(stage.init), bool(stage.merge_init))


def check_adapter(path: str, key: str) -> str:
    check_adapter_dir(path, key)
    return str(path)


# ----------------------------------------------------------------------------- stages
def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_name(cfg: DictConfig, stage_name: str) -> str:
    return f"{cfg.model.name}/{chain_name(cfg)}/stage_{stage_name}/seed{cfg.seed}"


def run_stage(
    cfg: DictConfig,
    plan: Plan,
    init_adapter: str | None,
    identity: dict,
    tokenizer,
    tasks: dict[str, Task],
    out_dir: Path,
    test_names: list[str],
) -> tuple[StageResult, dict | None]:
    stage_dir = out_dir / f"stage_{plan.name}"
    if wants_resume(cfg.get("resume"), cfg.get("ckpt_path")) and (done := stage_done(stage_dir)) is not None:
        log.info("stage %s finished before the interruption: reusing its adapter %s", plan.name, done["best_adapter"])
        return StageResult(
            plan.name, Path(done["best_adapter"]), done["best_score"], done["best_ckpt"], identity
        ), done["test"]
    stage_dir.mkdir(parents=True, exist_ok=True)
    # Each stage's randomness depends on the seed alone, not on what earlier stages drew, so a resumed
    # run that skips a finished stage draws the same numbers as an uninterrupted one.
    L.seed_everything(int(cfg.seed), workers=True)
    log.info("stage %s: tasks %s, %d epochs, init adapter %s", plan.name, plan.tasks, plan.max_epochs, init_adapter)
    dm = build_datamodule(cfg, tokenizer, tasks, plan.tasks, stage_dir, splits=("train", "val"))
    module = build_module(
        cfg,
        tokenizer,
        {t: tasks[t] for t in dict.fromkeys(plan.tasks + test_names)},
        init_adapter,
        merge_init=plan.merge_init,
    )
    loggers = build_loggers(cfg, run_name(cfg, plan.name), stage_dir)
    trainer = build_trainer(cfg, loggers, build_callbacks(cfg, stage_dir / "checkpoints"), plan.max_epochs)
    test_metrics = None
    try:
        for lg in loggers:
            lg.log_hyperparams(loggable_config(cfg))
        # weights_only: a checkpoint is data (tensors, numbers, strings); it never unpickles arbitrary objects.
        ckpt_path = resume_checkpoint(cfg, stage_dir)
        if problem := resume_strategy_problem(OmegaConf.to_container(cfg.trainer), ckpt_path):
            raise CheckpointError(problem)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        result = export_best(cfg, trainer, module, plan, stage_dir, identity)
        if test_names and cfg.generation.backend == "hf":
            test_metrics = run_test(cfg, trainer, module, tokenizer, tasks, test_names, out_dir / "test")
    finally:
        finish_loggers(loggers)
        # Callbacks and loggers can hold the module (bound methods, the trainer): drop them too, or the
        # model and optimizer survive this collection and share memory with the next job's.
        del trainer, module, dm, loggers
        release_memory()
    if not is_global_zero():
        return result, test_metrics
    if test_names and cfg.generation.backend == "vllm":
        # After the trained model is gone: vLLM loads the base and the exported adapter itself.
        test_metrics = run_test_vllm(cfg, tokenizer, tasks, test_names, out_dir / "test", result.best_adapter)
    if test_metrics and (card := read_card(result.best_adapter)) is not None:
        write_atomic(result.best_adapter / "README.md", model_card(card, test_metrics))
    registry.register(cfg.paths.registry_dir, identity, result.best_adapter, out_dir, result.best_score)
    mark_stage_done(
        stage_dir,
        {
            "best_adapter": str(result.best_adapter),
            "best_score": result.best_score,
            "best_ckpt": result.best_ckpt,
            "test": test_metrics,
        },
    )
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
    """A readable checkpoint of plain data, else a one-line CheckpointError (not an unpickling traceback from
    inside Lightning). Adapter-only checkpoints are small, so reading one twice costs little."""
    if path.is_dir():
        return str(path)  # a DeepSpeed checkpoint directory: its engine reads it
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={path} does not exist")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects beyond tensors and plain data, "
            f"which could run code ({_first_line(e)})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {_first_line(e)}); resume "
            "from another one or start without ckpt_path/resume"
        ) from None
    return str(path)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else ""


def export_best(
    cfg: DictConfig, trainer: L.Trainer, module: MentalGLMModule, plan: Plan, stage_dir: Path, identity: dict
) -> StageResult:
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
    monitor = ckpt_cb.monitor if ckpt_cb is not None else None
    card = run_card(
        cfg, stage=plan.name, trained_tasks=plan.tasks, monitor=monitor, best_score=score, run_dir=str(stage_dir.parent)
    )

    def save(tmp: Path) -> None:
        # The adapter carries its run: the card, a model card for people, and the tokenizer it was trained with.
        module.save_adapter(tmp, adapter)
        module.tokenizer.save_pretrained(str(tmp))
        write_card(tmp, card)
        write_atomic(Path(tmp) / "README.md", model_card(card))

    if trainer.is_global_zero:
        replace_dir_atomic(adapter_dir, save)
    trainer.strategy.barrier("export_best")  # the next stage reads the adapter on every rank
    log.info("stage %s: best %s %s, adapter -> %s", plan.name, monitor, score, adapter_dir)
    return StageResult(plan.name, adapter_dir, score, best or None, identity)


def test_title(cfg: DictConfig) -> str:
    """results.md's title: a model trained on label-only answers says so (it is not the paper's explainable one)."""
    if cfg.data.answers == "label_only":
        return f"Test results: a LABEL-ONLY model (data={cfg.data.name} trains the label sentence, no explanation)"
    return "Test results"


def consistency_judge(cfg: DictConfig, tasks: dict[str, Task], names: list[str], rows: list[dict], out_dir: Path):
    """The label-explanation consistency of the model's own test answers (the label-fallback metrics, or None): a
    TF-IDF explanation -> label classifier per tested task, fitted on the run's training explanations (saved as
    test/consistency_classifier.json, usable as evaluate.py label_fallback=), reads each answer's explanation;
    results.md reports how often it agrees with the stated label. The rows stay the test's own, so train.py's
    predictions equal evaluate.py's."""
    if not cfg.consistency or cfg.data.answers != "explained":
        return None
    try:
        import sklearn  # noqa: F401  (the classifier extra)
    except ImportError:
        log.warning("consistency=true needs scikit-learn (pip install -e '.[classifier]'): not judged")
        return None
    from mentalglm.commands.train_classifier import classifier_items
    from mentalglm.runtime.builders import load_splits
    from mentalglm.scoring.fallback import TfidfLabeler, label_fallback, labelers_json

    train = load_splits(cfg, tasks, names)["train"]
    labelers = {}
    for name in names:
        items, _ = classifier_items(tasks[name], [r for r in train if r["task"] == name], "explanation")
        try:
            labelers[name] = TfidfLabeler.fit(tasks[name], [x for x, _, _ in items], [y for _, y, _ in items])
        except ConfigError as e:
            log.warning("consistency of %s not judged: %s", name, e)
    if not labelers:
        return None
    classifier = out_dir / "consistency_classifier.json"
    write_atomic(classifier, labelers_json(labelers, {"input": "explanation"}))
    _, fallback = label_fallback(rows, {n: tasks[n] for n in names}, labelers)
    return {**fallback, "classifier": str(classifier)}


def run_test(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: MentalGLMModule,
    tokenizer,
    tasks: dict[str, Task],
    names: list[str],
    out_dir: Path,
) -> dict:
    dm = build_datamodule(cfg, tokenizer, tasks, names, out_dir, splits=("test",))
    # The module already holds the best adapter weights (export_best), so no checkpoint reload.
    trainer.test(module, datamodule=dm, ckpt_path=None, verbose=False)
    results = module.test_results
    val_rows = validation_scores(cfg, trainer, module, tokenizer, tasks, names, out_dir) if cfg.scores.enabled else []
    if not trainer.is_global_zero:
        return {**results, "f1_mean": mean_f1(results) if results else None}  # rank 0 writes the merged predictions
    rows = module.test_predictions
    risk = calibrations = None
    if cfg.scores.enabled:
        rows, risk, calibrations = calibrated(cfg, val_rows, rows, {n: tasks[n] for n in names})
    gold = [{"task": r["task"], "labels": r["gold_labels"], "aspect": r.get("aspect") or ""} for r in rows]
    fallback = consistency_judge(cfg, tasks, names, rows, out_dir)
    return write_evaluation(
        rows,
        results,
        out_dir,
        {n: tasks[n] for n in names},
        title=test_title(cfg),
        fallback=fallback,
        log_text=bool(cfg.log_text),
        loggers=trainer.loggers,
        baseline=dm.majority_baseline(gold),
        templates=OmegaConf.to_container(cfg.data.templates, resolve=True),
        risk=risk,
        calibrations=calibrations,
        bins=int(cfg.scores.bins),
        explanations=explanation_report(rows, {n: tasks[n] for n in names}, references=dm.references.get("test", {})),
        data=data_source(cfg, names, "test"),
    )


def run_test_vllm(
    cfg: DictConfig, tokenizer, tasks: dict[str, Task], names: list[str], out_dir: Path, adapter: Path
) -> dict:
    """The final test with `generation.backend=vllm`: the best adapter served by vLLM, scored and written as the
    hf backend's test is."""
    from mentalglm.commands.evaluate import vllm_rows
    from mentalglm.scoring.score import score

    dm = build_datamodule(cfg, tokenizer, tasks, names, out_dir, splits=("test",))
    dm.setup("test")
    rows, results = score(vllm_rows(cfg, tokenizer, dm, "test", str(adapter), out_dir), {n: tasks[n] for n in names})
    gold = [{"task": r["task"], "labels": r["gold_labels"], "aspect": r.get("aspect") or ""} for r in rows]
    fallback = consistency_judge(cfg, tasks, names, rows, out_dir)
    return write_evaluation(
        rows,
        results,
        out_dir,
        {n: tasks[n] for n in names},
        title=test_title(cfg),
        fallback=fallback,
        baseline=dm.majority_baseline(gold),
        templates=OmegaConf.to_container(cfg.data.templates, resolve=True),
        explanations=explanation_report(rows, {n: tasks[n] for n in names}, references=dm.references.get("test", {})),
        data=data_source(cfg, names, "test"),
    )


def train(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    tasks = build_tasks(cfg)
    selected = selected_tasks(cfg, tasks)
    plans = plan_stages(cfg, tasks)
    tests = test_tasks(cfg, selected) if cfg.test else []
    check_train_config(cfg, plans, tests, tasks)
    if cfg.data.answers == "label_only":
        log.warning("data=%s trains LABEL-ONLY answers (no explanation), not the paper's model", cfg.data.name)
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    done: dict[str, StageResult] = {}
    summary_stages: dict[str, dict] = {}
    test_metrics: dict | None = None
    last: StageResult | None = None
    for i, plan in enumerate(plans):
        init, start = initial_adapter(cfg, plan, done, selected)
        identity = registry.stage_identity(cfg, plan.name, plan.tasks, start)
        is_last = i == len(plans) - 1
        last, test_metrics = run_stage(cfg, plan, init, identity, tokenizer, tasks, out_dir, tests if is_last else [])
        done[plan.name] = last
        summary_stages[plan.name] = {
            "init_adapter": init,
            "best_adapter": str(last.best_adapter),
            "best_val_f1_mean": last.best_score,  # the best of the monitored metric (val/f1_mean by default)
            "monitor": OmegaConf.select(cfg, "callbacks.model_checkpoint.monitor", default="val/f1_mean"),
            "best_score": last.best_score,
            "best_checkpoint": last.best_ckpt,
        }
    summary = {
        "data": cfg.data.name,
        "answers": cfg.data.answers,  # explained (the paper's model) | label_only
        "stages": summary_stages,
        "best_adapter": str(last.best_adapter),
        "best_val_f1_mean": last.best_score,
        "test": test_metrics,
    }
    if is_global_zero():
        write_json_atomic(out_dir / "summary.json", summary)
    return summary


def closing_lines(out_dir: Path, summary: dict) -> str:
    """What a run ends with on the console: the test table, where everything is, and the next command."""
    lines = [""]
    results = out_dir / "test" / "results.md"
    if results.is_file():
        text = results.read_text(encoding="utf-8").splitlines()
        start = next((i for i, x in enumerate(text) if x.startswith("| Task")), len(text))
        end = next((i for i in range(start, len(text)) if not text[i].startswith("|")), len(text))
        lines += [text[0].lstrip("# "), "", *text[start:end], ""]
    lines += [
        f"run directory: {out_dir} (test/results.md, test/predictions.jsonl, summary.json)",
        f"best adapter:  {summary['best_adapter']} (its run card restores the run)",
        "next:",
        f"  python predict.py run_dir={out_dir} task=sos_hl_1k \"text='...'\"",
        f"  python evaluate.py run_dir={out_dir}",
        f"  python serve.py run_dir={out_dir}",
    ]
    return "\n".join(lines)


def run(cfg: DictConfig) -> float | None:
    """train.py's job: one run, or one job of a sweep (a failing job is recorded and the sweep goes on)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mentalglm.cli import job
    from mentalglm.commands.sweep import record_failure

    hc = HydraConfig.get()
    summary = None
    try:
        with job(cfg):
            summary = train(cfg)
            if hc.mode != RunMode.MULTIRUN and is_global_zero():
                print(closing_lines(Path(cfg.paths.output_dir), summary))
    except Exception as e:
        if hc.mode != RunMode.MULTIRUN:
            raise  # a user error: one `error:` line on the console, its traceback in train.log
        # One failing job must not end the sweep: record why, let the others run; the sweep exits non-zero.
        log.exception("job %s failed", hc.job.num)
        record_failure(hc.runtime.output_dir, e)
    if summary is None:
        # The failed job's model and optimizer outlive its traceback (gone once the except block ends) in
        # reference cycles: collect them now, not during the next job. None, not nan: Optuna marks the trial
        # failed and the search goes on (a nan makes hydra-optuna-sweeper's second study.tell raise).
        release_memory()
        return None
    test = summary.get("test") or {}
    # The value an Optuna sweep optimises: the last stage's best validation score.
    return summary.get("best_val_f1_mean") if summary.get("best_val_f1_mean") is not None else test.get("f1_mean")
