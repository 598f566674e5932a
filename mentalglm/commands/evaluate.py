"""What evaluate.py runs: score a predictions file, or generate with a model (+ adapter) and score."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mentalglm.checks import check_evaluate_config
from mentalglm.commands.scores import calibrated, validation_scores
from mentalglm.data.datamodule import item_key
from mentalglm.errors import ConfigError
from mentalglm.fileio.partial import PartialPredictions, fingerprint
from mentalglm.models.loading import load_tokenizer
from mentalglm.models.module import ROW_FIELDS
from mentalglm.reporting.writer import score_predictions_file, with_fallback, write_evaluation
from mentalglm.runtime.builders import (
    build_datamodule,
    build_loggers,
    build_module,
    build_tasks,
    build_trainer,
    resolve_adapter,
    selected_tasks,
    tasks_with_split,
)
from mentalglm.runtime.resume import wants_resume
from mentalglm.runtime.run_card import data_source
from mentalglm.scoring.parsing import MODES
from mentalglm.scoring.score import score
from mentalglm.scoring.text_metrics import TOKENIZERS, explanation_report
from mentalglm.tasks import TASKS, Task
from mentalglm.tracking import finish_loggers

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    from mentalglm.cli import run_command

    return run_command(evaluate, cfg)


def evaluate(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.output_dir)
    if cfg.get("report") == "ablation":
        from mentalglm.reporting.ablation import rebuild_ablation

        if not cfg.get("sweep_dir"):
            raise ConfigError("report=ablation needs sweep_dir=PATH (a train.py -m sweep directory)")
        return rebuild_ablation(cfg.sweep_dir)
    if cfg.get("report") == "paper":
        from mentalglm.reporting.paper import paper_report

        rows = OmegaConf.to_container(cfg.rows, resolve=True) if cfg.get("rows") is not None else []
        return paper_report(str(cfg.table), rows, out_dir)
    if cfg.get("report"):
        raise ConfigError(f"report={cfg.report!r} is unknown; the reports are `ablation` and `paper`")
    if cfg.get("parser_mode") not in (None, *MODES):
        raise ConfigError(f"parser_mode={cfg.parser_mode!r} is not one of {', '.join(MODES)} (or null)")
    if cfg.explanation_tokenizer not in TOKENIZERS:
        raise ConfigError(f"explanation_tokenizer={cfg.explanation_tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    tasks = build_tasks(cfg)
    bertscore = build_bertscore(cfg)  # before any generation: a bad encoder setting fails at once
    if cfg.get("predictions"):
        return score_predictions_file(
            cfg.predictions,
            out_dir,
            scoring_tasks(tasks),
            templates=OmegaConf.to_container(cfg.data.templates, resolve=True),
            on_duplicate=cfg.on_duplicate,
            parser_mode=cfg.get("parser_mode"),
            label_fallback=cfg.get("label_fallback"),
            explanation_tokenizer=cfg.explanation_tokenizer,
            bertscore=bertscore,
        )
    return evaluate_model(cfg, out_dir, tasks, bertscore)


def build_bertscore(cfg: DictConfig):
    """The BERTScore encoder of explanation_bertscore, or None while its model is null."""
    settings = cfg.explanation_bertscore
    if not settings.model:
        return None
    from mentalglm.scoring.text_metrics import BertScore

    return BertScore(str(settings.model), settings.num_layers, int(settings.batch_size))


def scoring_tasks(tasks: dict[str, Task]) -> dict[str, Task]:
    """What a predictions file's rows may name: the data config's tasks, then every other built-in task."""
    return {**tasks, **{n: t for n, t in TASKS.items() if n not in tasks}}


def cpu_precision(cfg: DictConfig) -> dict:
    """Generation on a CPU runs in fp32 unless trainer.precision (or trainer=) is on the command line: bf16
    autocast there is slower and gives other answers than the fp32 test of a CPU training run."""
    import torch

    from mentalglm.checks import BF16, FP16
    from mentalglm.runtime.run_card import command_line

    accelerator = cfg.trainer.get("accelerator")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    asked = any(key in ("trainer", "trainer.precision") for key, _ in command_line())
    if on_cpu and str(cfg.trainer.get("precision")) in BF16 | FP16 and not asked:
        log.info("on a CPU: generating in fp32 (trainer.precision=%s asks otherwise)", cfg.trainer.precision)
        return {"precision": "32-true"}
    return {}


def evaluate_model(cfg: DictConfig, out_dir: Path, tasks: dict[str, Task], bertscore=None) -> dict:
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split={cfg.split} is not one of test, val")
    names = tasks_with_split(cfg, selected_tasks(cfg, tasks), cfg.split)
    check_evaluate_config(cfg, names)
    adapter = resolve_adapter(cfg)
    # A base model answers in its own words: the free-form reading unless the user chose.
    parser_mode = cfg.get("parser_mode") or ("free" if adapter is None else "strict")
    # ... and is told the label set it must choose from (the paper's Eq. 1 task description).
    describe = adapter is None if cfg.data.get("task_description") is None else bool(cfg.data.task_description)
    if adapter is None:
        log.info(
            "no adapter: evaluating the base model %s with %d-shot prompts (parser_mode=%s)",
            cfg.model.name,
            cfg.shots,
            parser_mode,
        )
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
        describe=describe,
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
    trainer = build_trainer(cfg, loggers, [progress], **cpu_precision(cfg))
    try:
        if cfg.generation.backend == "vllm":
            new = vllm_rows(cfg, tokenizer, dm, cfg.split, adapter, out_dir, on_rows=progress.append)
        else:
            if cfg.split in dm.datasets:
                trainer.test(module, datamodule=dm, verbose=False)
            new = module.test_predictions
        # Rows written before an interruption and rows of this session, scored together by the one scoring path.
        rows, results = score(
            [{k: r[k] for k in (*ROW_FIELDS, "query") if k in r} for r in done + new], eval_tasks, parser_mode
        )
        val_rows = []
        if cfg.scores.enabled and cfg.split == "test":
            val_rows = validation_scores(
                cfg, trainer, module, tokenizer, tasks, names, out_dir, shots=int(cfg.shots), describe=describe
            )
        if not trainer.is_global_zero:
            return results  # every rank holds all rows and metrics; rank 0 alone writes them
        risk = calibrations = fallback = None
        if cfg.get("label_fallback"):
            rows, fallback = with_fallback(rows, eval_tasks, cfg.label_fallback)
        if cfg.scores.enabled:
            rows, risk, calibrations = calibrated(cfg, val_rows, rows, eval_tasks)
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
            risk=risk,
            calibrations=calibrations,
            bins=int(cfg.scores.bins),
            fallback=fallback,
            explanations=explanation_report(
                rows, eval_tasks, cfg.explanation_tokenizer, dm.references.get(cfg.split, {}), bertscore
            ),
            data=data_source(cfg, names, cfg.split),
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
        "scores": bool(cfg.scores.enabled),
        "tasks": tasks,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "data": {k: data.get(k) for k in ("max_length", "limit_eval", "templates", "task_description")},
        "files": {t: data["tasks"][t] for t in tasks},
    }


def vllm_rows(
    cfg: DictConfig, tokenizer, dm, split: str, adapter: str | None, out_dir: Path, on_rows=None, chunk: int = 256
) -> list[dict]:
    """The split's answers from vLLM (`generation.backend=vllm`), as the test loop's rows; `on_rows` receives each
    chunk as it is done (evaluate.py appends them to its partial predictions)."""
    from tqdm import tqdm

    from mentalglm.models.loading import resolve_pretrained
    from mentalglm.serving.vllm import vllm_generator

    if split not in dm.datasets:
        return []
    ds = dm.datasets[split]
    items = [ds[i] for i in range(len(ds))]
    rows: list[dict] = []
    bar = tqdm(total=len(items), desc=f"vLLM {split}", disable=not cfg.trainer.get("enable_progress_bar", True))
    max_tokens = int(cfg.generation.max_new_tokens)
    with vllm_generator(
        cfg.generation.vllm,
        resolve_pretrained(cfg.model, cfg.paths.cache_dir),
        tokenizer,
        adapter=adapter,
        max_model_len=int(cfg.data.max_length) + max_tokens,
        log_file=out_dir / "vllm.log",
    ) as generate:
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            texts = generate([x["input_ids"] for x in part], max_tokens, progress=bar.update)
            new = [
                {
                    "task": x["task"],
                    "id": x["id"],
                    "index": int(x["index"]),
                    "aspect": x["aspect"],
                    "output": text,
                    "truncated": capped,
                    "gold_labels": list(x["labels"]),
                }
                for x, (text, capped) in zip(part, texts)
            ]
            if on_rows is not None:
                on_rows(new)
            rows += new
    bar.close()
    return rows
