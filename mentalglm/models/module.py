"""LightningModule: LoRA fine-tuning of a causal LM with generation-based validation and test."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from mentalglm.config import GenerationConfig, LoraConfig, ModelConfig, OptimizerConfig, as_config, to_dict
from mentalglm.errors import CheckpointError, ConfigError, NumericsError
from mentalglm.models.loading import apply_lora, count_parameters, load_base_model
from mentalglm.models.loss import logits_selection, supervised_loss, supervised_positions
from mentalglm.runtime.distributed import gather_rows, gathered_for_generation, shard_model
from mentalglm.runtime.generation import generate_batch_capped
from mentalglm.runtime.likelihood import LabelScorer, answer_of
from mentalglm.runtime.throughput import FlopSpec, batch_samples, process_age, sample_lengths
from mentalglm.scoring.metrics import mean_f1
from mentalglm.scoring.score import score
from mentalglm.tasks import TASKS, Task

log = logging.getLogger(__name__)

SCHEDULERS = ("linear", "cosine", "constant")
VALIDATION_MODES = ("generate", "likelihood")
# Rows of validation and test: what the model answered for each item, before scoring (with label likelihoods:
# `scores`, label -> probability, and `likelihood_labels`, the labels they predict).
ROW_FIELDS = ("task", "id", "index", "aspect", "output", "truncated", "gold_labels", "scores", "likelihood_labels")

# Kept as an alias: the name under which training code and tests have caught divergence.
NonFiniteLossError = NumericsError


class MentalGLMModule(L.LightningModule):
    """Wraps `AutoModelForCausalLM` + peft LoRA.

    The model is built in `configure_model` (not `__init__`) so that sharded strategies can build it on the
    right device, and checkpoints hold only trainable (adapter) weights. No hyper-parameters are saved into
    checkpoints (the run directory's config holds them): nothing a user put in the config travels with a
    checkpoint except the identity it is checked against.
    """

    def __init__(
        self,
        model: ModelConfig | Mapping[str, Any],
        lora: LoraConfig | Mapping[str, Any] | None,
        optimizer: OptimizerConfig | Mapping[str, Any],
        generation: GenerationConfig | Mapping[str, Any],
        tasks: Mapping[str, Task] | list[str],
        *,
        tokenizer=None,
        init_adapter: str | None = None,
        merge_init_adapter: bool = False,
        cache_dir: str = ".cache",
        max_bad_steps: int = 20,
        keep_inputs: bool = False,
        scores: bool = False,
        validation_mode: str = "generate",
    ):
        super().__init__()
        self.model_cfg = as_config(ModelConfig, model)
        self.lora_cfg = as_config(LoraConfig, lora) if lora is not None else None
        self.optimizer_cfg = as_config(OptimizerConfig, optimizer)
        self.generation_cfg = as_config(GenerationConfig, generation)
        if self.optimizer_cfg.scheduler not in SCHEDULERS:
            raise ConfigError(
                f"optimizer.scheduler must be one of {', '.join(SCHEDULERS)}, got {self.optimizer_cfg.scheduler!r}"
            )
        if self.optimizer_cfg.lr <= 0 or not 0 <= self.optimizer_cfg.warmup_ratio < 1:
            raise ConfigError(
                f"optimizer.lr must be > 0 and optimizer.warmup_ratio in [0, 1); got lr="
                f"{self.optimizer_cfg.lr}, warmup_ratio={self.optimizer_cfg.warmup_ratio}"
            )
        if validation_mode not in VALIDATION_MODES:
            raise ConfigError(f"validation.mode must be one of {', '.join(VALIDATION_MODES)}, got {validation_mode!r}")
        self.tasks = dict(tasks) if isinstance(tasks, Mapping) else {n: TASKS[n] for n in tasks}
        # Label likelihoods: with every test prediction (`scores`), instead of generating in validation
        # (`validation_mode="likelihood"`), or, for a calibration pass over validation, alone (`collect_scores`).
        self.score_labels, self.validation_mode, self.collect_scores = scores, validation_mode, False
        self.val_score_rows: list[dict] = []
        self._scorer: LabelScorer | None = None
        self.tokenizer = tokenizer
        self.init_adapter, self.merge_init_adapter = init_adapter, merge_init_adapter
        self.cache_dir, self.max_bad_steps, self.keep_inputs = cache_dir, max_bad_steps, keep_inputs
        self.model: nn.Module | None = None
        self.test_predictions: list[dict] = []
        self.test_results: dict[str, dict] = {}
        self._val_rows: list[dict] = []
        self.strict_loading = False  # checkpoints carry adapter weights only
        self.bad_steps = 0
        self.bad_steps_total = 0
        # Read by Lightning's ThroughputMonitor after each batch (MFU where the device's peak is known).
        self.flops_per_batch: int | None = None
        self._flop_spec: FlopSpec | None = None
        self._logits_selection: str | None = None

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        base = load_base_model(self.model_cfg, self.cache_dir)
        if self.lora_cfg is None and not self.init_adapter:
            self.model = base  # zero/few-shot baseline: the plain model
        else:
            self.model = apply_lora(base, self.lora_cfg, self.init_adapter, self.merge_init_adapter)
            trainable, total = count_parameters(self.model)
            log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
        if self.device_mesh is not None:
            # trainer=fsdp (Lightning's ModelParallelStrategy): FSDP2 is applied here, after LoRA is in place.
            shard_model(self.model, self.device_mesh)

    def forward(self, **batch):
        return self.model(**batch)

    @property
    def logits_selection(self) -> str:
        """How the loss asks the model for logits at supervised positions only (mentalglm/models/loss.py)."""
        if self._logits_selection is None:
            self._logits_selection = logits_selection(self.model)
        return self._logits_selection

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        # from_pretrained returns the base in eval mode and Lightning keeps each submodule's mode: without this
        # the base's dropout would stay off while training (LoRA's own layers are created in train mode).
        self.model.train()

    def training_step(self, batch: dict, batch_idx: int):
        loss = supervised_loss(self.model, batch, self.logits_selection, self.model_cfg.loss_chunk_size)
        n = batch_samples(batch)
        if not torch.isfinite(loss):
            return self._skip_non_finite(loss)
        self.bad_steps = 0
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.global_step == 0 and batch_idx == 0 and (age := process_age()) is not None:
            log.info("first training step %.1f s after the process started", age)
        # Batches differ in length, so the FLOPs are counted per batch (real tokens only: padding is waste).
        if self._flop_spec is None:
            self._flop_spec = FlopSpec.from_model(self.model)
        self.flops_per_batch = self._flop_spec.train_flops(sample_lengths(batch), supervised_positions(batch["labels"]))

    def on_validation_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.flops_per_batch = None  # generation: no MFU (a training batch's count would be wrong here)

    def on_test_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.flops_per_batch = None

    def _skip_non_finite(self, loss: torch.Tensor):
        """fp16 overflow on GLM-4 is common: skip the step, count it, stop with a remedy when it persists."""
        self.bad_steps += 1
        self.bad_steps_total += 1
        self.log("train/non_finite_steps", float(self.bad_steps_total), on_step=True)
        log.warning(
            "non-finite loss (%s) at step %d: step skipped (%d in a row)", loss.item(), self.global_step, self.bad_steps
        )
        if self.bad_steps >= self.max_bad_steps:
            raise NumericsError(
                f"{self.bad_steps} consecutive non-finite losses. Likely fp16 overflow: use "
                "trainer.precision=bf16-mixed where the GPU supports it, keep 16-mixed (with loss scaling) rather "
                "than pure fp16, or lower optimizer.lr."
            )
        return None  # Lightning skips backward and the optimizer step

    def configure_optimizers(self):
        from transformers import (
            get_constant_schedule_with_warmup,
            get_cosine_schedule_with_warmup,
            get_linear_schedule_with_warmup,
        )

        cfg = self.optimizer_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay), betas=tuple(cfg.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(float(cfg.warmup_ratio) * total)
        if cfg.scheduler == "constant":
            sched = get_constant_schedule_with_warmup(opt, warmup)
        elif cfg.scheduler == "cosine":
            sched = get_cosine_schedule_with_warmup(opt, warmup, total)
        else:
            sched = get_linear_schedule_with_warmup(opt, warmup, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad or "lora_" in n}
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in keep or not k.startswith("model.")}
        bad = [k for k, v in state.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
        if bad:
            # Raised before anything is written: the last checkpoint on disk stays the last good one.
            raise NumericsError(
                f"adapter weights became non-finite at step {self.global_step} ({len(bad)} tensors, e.g. {bad[0]}); "
                "refusing to write a checkpoint. Likely fp16 overflow: use trainer.precision=bf16-mixed where the "
                "GPU supports it, or 16-mixed (loss scaling) rather than 16-true, or lower optimizer.lr; then "
                "resume=true continues from the last good checkpoint."
            )
        checkpoint["state_dict"] = state
        checkpoint["mentalglm"] = {
            **self._checkpoint_identity(),
            "shapes": {k: list(v.shape) for k, v in state.items()},
            "tasks": list(self.tasks),
            "non_finite_steps": self.bad_steps_total,
            "fsdp": self.device_mesh is not None,
        }  # whose optimizer-state layout

    def _checkpoint_identity(self) -> dict:
        lora = self.lora_cfg
        targets = lora.target_modules if lora is not None else None
        return {
            "base": str(self.model_cfg.pretrained or self.model_cfg.name),
            "lora_r": lora.r if lora else None,
            "lora_alpha": lora.alpha if lora else None,
            "target_modules": targets if isinstance(targets, str) or targets is None else sorted(targets),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another base model or LoRA shape, naming the difference (Lightning's own
        error would be a size-mismatch traceback, or with strict=False nothing at all)."""
        meta = checkpoint.get("mentalglm")
        if meta is None:
            return
        mine = self._checkpoint_identity()
        problems = [
            f"{key} {meta[key]!r} (this run: {mine[key]!r})"
            for key in mine
            if meta.get(key) is not None and meta[key] != mine[key]
        ]
        shapes = {f"model.{n}": list(p.shape) for n, p in self.model.named_parameters() if p.requires_grad}
        for key, shape in (meta.get("shapes") or {}).items():
            if key.startswith("model.") and shapes.get(key, shape) != shape:
                problems.append(f"{key} has shape {shape} (this run: {shapes[key]})")
                break
        if problems:
            raise CheckpointError(
                f"the checkpoint does not fit this run: it was trained with {'; '.join(problems)}. "
                "Use the model and lora settings it was trained with, or start without "
                "ckpt_path/resume"
            )
        self.bad_steps_total = int(meta.get("non_finite_steps", 0))

    def save_adapter(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """`state`: the full adapter weights (`adapter_state_dict`), needed when the model is sharded."""
        self.model.save_pretrained(str(path), safe_serialization=True, state_dict=state)

    # ------------------------------------------------------------------ generation-based evaluation
    def generate_texts(self, prompts: list[list[int]], *, full: bool) -> list[tuple[str, bool]]:
        """One planned batch of prompts: full answers (test) or the label sentence only (validation), each with
        whether the token cap cut it."""
        cfg = self.generation_cfg
        stop = [] if full else list(cfg.val_stop_strings)
        max_new = int(cfg.max_new_tokens if full else cfg.val_max_new_tokens)
        # Entered on every rank for every batch, empty ones included (it is a collective on sharded models).
        with gathered_for_generation(self.model, self.trainer.strategy if self._trainer is not None else None):
            return generate_batch_capped(self.model, self.tokenizer, prompts, max_new, stop)

    @property
    def scorer(self) -> LabelScorer:
        if self._scorer is None:
            self._scorer = LabelScorer(
                self.tokenizer, self.tasks, chat=bool(self.model_cfg.chat), system=self.model_cfg.system
            )
        return self._scorer

    def label_scores(self, batch: dict) -> list:
        with gathered_for_generation(self.model, self.trainer.strategy if self._trainer is not None else None):
            return self.scorer(self.model, batch["prompts"], batch["task"])

    def _likelihood_rows(self, batch: dict) -> list[dict]:
        """Rows whose answer is the label sentence of the labels the likelihoods predict (scored as any answer)."""
        scored = self.label_scores(batch)
        texts = [answer_of(self.tasks[name], s.labels) for name, s in zip(batch["task"], scored)]
        rows = self._rows(batch, [(text, False) for text in texts])
        return [self._with_scores(row, s) for row, s in zip(rows, scored)]

    @staticmethod
    def _with_scores(row: dict, scored) -> dict:
        return {**row, "scores": scored.probs, "likelihood_labels": scored.labels}

    def _rows(self, batch: dict, texts: list[tuple[str, bool]]) -> list[dict]:
        rows = []
        for i, (text, capped) in enumerate(texts):
            rows.append(
                {
                    "task": batch["task"][i],
                    "id": batch["id"][i],
                    "index": int(batch["index"][i]),
                    "aspect": batch["aspect"][i],
                    "output": text,
                    "truncated": capped,
                    "gold_labels": list(batch["labels"][i]),
                }
            )
            if self.keep_inputs:
                rows[-1]["query"] = self.tokenizer.decode(batch["prompts"][i], skip_special_tokens=True)
        return rows

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.validation_mode == "likelihood" or self.collect_scores:
            self._val_rows.extend(self._likelihood_rows(batch))
        else:
            self._val_rows.extend(self._rows(batch, self.generate_texts(batch["prompts"], full=False)))

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def on_validation_epoch_end(self) -> None:
        # Every rank generated its own batches: gather the rows, then every rank scores all of them alike.
        rows = gather_rows(self._val_rows)
        self._val_rows = []
        if self.collect_scores:  # a calibration pass: the rows are its result, nothing is logged
            self.val_score_rows = rows
            return
        _, results = score(rows, self._eval_tasks())
        self._log_results("val", results)
        if self.validation_mode == "likelihood":
            self._log_ranking("val", rows)

    def _log_ranking(self, prefix: str, rows: list[dict]) -> None:
        from mentalglm.scoring.calibration import probability_metrics, task_scores

        for name, task in self._eval_tasks().items():
            metrics = probability_metrics(task_scores(task, rows))
            for key in ("auroc", "auprc"):
                if metrics.get(key) is not None:
                    self.log(f"{prefix}/{name}/{key}", float(metrics[key]), sync_dist=False)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        rows = self._rows(batch, self.generate_texts(batch["prompts"], full=True))
        if self.score_labels:
            rows = [self._with_scores(row, s) for row, s in zip(rows, self.label_scores(batch))]
        self.test_predictions.extend(rows)

    def on_test_epoch_start(self) -> None:
        self.test_predictions = []

    def on_test_epoch_end(self) -> None:
        # Each rank predicted its own batches: every rank gets all rows (the writers sort them by index).
        self.test_predictions, self.test_results = score(gather_rows(self.test_predictions), self._eval_tasks())
        self._log_results("test", self.test_results)

    def _eval_tasks(self) -> dict[str, Task]:
        """The tasks of the datamodule being evaluated, in its order (metrics keep the report order)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = [n for n in dm.tasks if n in self.tasks] if dm is not None else list(self.tasks)
        return {n: self.tasks[n] for n in names}

    def _log_results(self, prefix: str, results: dict[str, dict]) -> None:
        for key, values in results.items():
            for metric in ("precision", "recall", "f1", "parse_rate", "accuracy", "f1_weighted"):
                if metric in values:
                    self.log(f"{prefix}/{key}/{metric}", float(values[metric]), sync_dist=False)
        if results:
            self.log(f"{prefix}/f1_mean", float(mean_f1(results)), prog_bar=True, sync_dist=False)
        # MentaLLaMA's selection metric for stage one: callbacks.model_checkpoint.monitor=val/f1_weighted_mean
        weighted = [v["f1_weighted"] for k, v in results.items() if "f1_weighted" in v and self._weighted(k)]
        if weighted:
            self.log(f"{prefix}/f1_weighted_mean", sum(weighted) / len(weighted), sync_dist=False)

    def _weighted(self, key: str) -> bool:
        task = self.tasks.get(key)
        return task is not None and "f1_weighted" in task.secondary_metrics

    def hyperparameters(self) -> dict:
        """The module's settings as plain data (for reports; never written into checkpoints)."""
        return {
            "model": to_dict(self.model_cfg),
            "lora": to_dict(self.lora_cfg) if self.lora_cfg else None,
            "optimizer": to_dict(self.optimizer_cfg),
            "generation": to_dict(self.generation_cfg),
        }
