"""LightningModule: LoRA fine-tuning of a causal LM with generation-based validation and test."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from torch import nn

from mentalglm.distributed import gather_rows, gathered_for_generation, shard_model
from mentalglm.errors import ConfigError
from mentalglm.eval.generation import generate
from mentalglm.eval.metrics import TaskMetrics, mean_f1
from mentalglm.eval.parsing import parse_labels
from mentalglm.models.loading import apply_lora, count_parameters, load_base_model
from mentalglm.models.loss import logits_selection, supervised_loss, supervised_positions
from mentalglm.tasks import get_task
from mentalglm.throughput import FlopSpec, batch_samples, sample_lengths

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class MentalGLMModule(L.LightningModule):
    """Wraps `AutoModelForCausalLM` + peft LoRA.

    The model is built in `configure_model` (not `__init__`) so that sharded strategies can build it on the
    right device, and checkpoints hold only trainable (adapter) weights.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        lora: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        generation: Mapping[str, Any],
        tasks: list[str],
        templates: Mapping[str, Any] | None = None,
        init_adapter: str | None = None,
        merge_init_adapter: bool = False,
        cache_dir: str = ".cache",
        tokenizer=None,
        max_bad_steps: int = 20,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.model: nn.Module | None = None
        self.tasks = {name: get_task(name, (templates or {}).get(name)) for name in tasks}
        # ModuleDict so metric states move with the module and sync across ranks.
        self.val_metrics = nn.ModuleDict({n: TaskMetrics(t) for n, t in self.tasks.items()})
        self.test_metrics = nn.ModuleDict({n: TaskMetrics(t) for n, t in self.tasks.items()})
        self.test_predictions: list[dict] = []
        self.strict_loading = False  # checkpoints carry adapter weights only
        self.bad_steps = 0
        self.bad_steps_total = 0
        self.keep_inputs = False  # evaluate.py save_inputs=true: write prompts (with posts) to predictions
        # Read by Lightning's ThroughputMonitor after each batch (MFU where the device's peak is known).
        self.flops_per_batch: int | None = None
        self._flop_spec: FlopSpec | None = None
        self._logits_selection: str | None = None

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        base = load_base_model(self.hparams.model, self.hparams.cache_dir)
        if self.hparams.lora is None and not self.hparams.init_adapter:
            self.model = base  # zero/few-shot baseline: the plain model
        else:
            self.model = apply_lora(base, self.hparams.lora or {}, self.hparams.init_adapter,
                                    self.hparams.merge_init_adapter)
            trainable, total = count_parameters(self.model)
            log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}",
                     100 * trainable / total)
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
    def training_step(self, batch: dict, batch_idx: int):
        loss = supervised_loss(self.model, batch, self.logits_selection)
        n = batch_samples(batch)
        if not torch.isfinite(loss):
            return self._skip_non_finite(loss)
        self.bad_steps = 0
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Batches differ in length, so the FLOPs are counted per batch (real tokens only: padding is waste).
        if self._flop_spec is None:
            self._flop_spec = FlopSpec.from_model(self.model)
        self.flops_per_batch = self._flop_spec.train_flops(
            sample_lengths(batch), supervised_positions(batch["labels"]))

    def on_validation_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.flops_per_batch = None  # generation: no MFU (a training batch's count would be wrong here)

    def on_test_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.flops_per_batch = None

    def _skip_non_finite(self, loss: torch.Tensor):
        """fp16 overflow on GLM-4 is common: skip the step, count it, stop with a remedy when it persists."""
        self.bad_steps += 1
        self.bad_steps_total += 1
        self.log("train/non_finite_steps", float(self.bad_steps_total), on_step=True)
        log.warning("non-finite loss (%s) at step %d: step skipped (%d in a row)", loss.item(), self.global_step,
                    self.bad_steps)
        if self.bad_steps >= self.hparams.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps} consecutive non-finite losses. Likely fp16 overflow: use "
                "trainer.precision=bf16-mixed where the GPU supports it, keep 16-mixed (with loss scaling) rather "
                "than pure fp16, or lower optimizer.lr.")
        return None  # Lightning skips backward and the optimizer step

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        cfg = self.hparams.optimizer
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg.get("weight_decay", 0.0)),
                                betas=tuple(cfg.get("betas", (0.9, 0.999))))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(float(cfg.get("warmup_ratio", 0.01)) * total)
        sched = get_linear_schedule_with_warmup(opt, warmup, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad or "lora_" in n}
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in keep or not k.startswith("model.")}
        bad = [k for k, v in state.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
        if bad:
            # Raised before anything is written: the last checkpoint on disk stays the last good one.
            raise NonFiniteLossError(
                f"adapter weights became non-finite at step {self.global_step} ({len(bad)} tensors, e.g. {bad[0]}); "
                "refusing to write a checkpoint. Likely fp16 overflow: use trainer.precision=bf16-mixed where the "
                "GPU supports it, or 16-mixed (loss scaling) rather than 16-true, or lower optimizer.lr; then "
                "resume=true continues from the last good checkpoint.")
        checkpoint["state_dict"] = state
        checkpoint["mentalglm"] = {**self._checkpoint_identity(), "shapes": {k: list(v.shape) for k, v in state.items()},
                                   "tasks": list(self.tasks), "non_finite_steps": self.bad_steps_total,
                                   "fsdp": self.device_mesh is not None}  # whose optimizer-state layout

    def _checkpoint_identity(self) -> dict:
        lora = self.hparams.lora or {}
        targets = lora.get("target_modules")
        return {"base": str(self.hparams.model.get("pretrained") or self.hparams.model.get("name")),
                "lora_r": lora.get("r"), "lora_alpha": lora.get("alpha"),
                "target_modules": targets if isinstance(targets, str) or targets is None else sorted(targets)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another base model or LoRA shape, naming the difference (Lightning's own
        error would be a size-mismatch traceback, or with strict=False nothing at all)."""
        meta = checkpoint.get("mentalglm")
        if meta is None:
            return
        mine = self._checkpoint_identity()
        problems = [f"{key} {meta[key]!r} (this run: {mine[key]!r})" for key in mine
                    if meta.get(key) is not None and meta[key] != mine[key]]
        shapes = {f"model.{n}": list(p.shape) for n, p in self.model.named_parameters() if p.requires_grad}
        for key, shape in (meta.get("shapes") or {}).items():
            if key.startswith("model.") and shapes.get(key, shape) != shape:
                problems.append(f"{key} has shape {shape} (this run: {shapes[key]})")
                break
        if problems:
            raise ConfigError(f"the checkpoint does not fit this run: it was trained with {'; '.join(problems)}. "
                              "Use the model and lora settings it was trained with, or start without "
                              "ckpt_path/resume")
        self.bad_steps_total = int(meta.get("non_finite_steps", 0))

    def save_adapter(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """`state`: the full adapter weights (`adapter_state_dict`), needed when the model is sharded."""
        self.model.save_pretrained(str(path), safe_serialization=True, state_dict=state)

    # ------------------------------------------------------------------ generation-based evaluation
    def _generate(self, batch: dict, *, full: bool) -> list[str]:
        cfg = self.hparams.generation
        ids, mask = batch["input_ids"], batch["attention_mask"]
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        stop = [] if full else list(cfg.get("val_stop_strings", []))
        max_new = int(cfg["max_new_tokens"] if full else cfg["val_max_new_tokens"])
        pad = None if full else cfg.get("val_max_pad_fraction")
        # Entered on every rank for every batch, empty ones included (it is a collective on sharded models).
        with gathered_for_generation(self.model, self.trainer.strategy if self._trainer is not None else None):
            return generate(self.model, self.tokenizer, prompts, batch_size=len(prompts), max_new_tokens=max_new,
                            stop_strings=stop, max_pad_fraction=pad)

    def _score(self, batch: dict, texts: list[str], metrics: nn.ModuleDict) -> list[dict]:
        rows = []
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, task_name in enumerate(batch["task"]):
            by_task[task_name].append(i)
        for task_name, idx in by_task.items():
            task = self.tasks[task_name]
            parsed = [parse_labels(task, texts[i]) for i in idx]
            metrics[task_name].update([p.labels for p in parsed], [list(batch["labels"][i]) for i in idx],
                                      [p.parsed for p in parsed], [batch["aspect"][i] for i in idx])
            for i, p in zip(idx, parsed):
                rows.append({"task": task_name, "id": batch["id"][i], "index": int(batch["index"][i]),
                             "output": texts[i], "gold_labels": list(batch["labels"][i]),
                             "pred_labels": p.labels, "parsed": p.parsed, "aspect": batch["aspect"][i]})
                if self.keep_inputs:
                    prompt = batch["input_ids"][i][batch["attention_mask"][i].bool()]
                    rows[-1]["query"] = self.tokenizer.decode(prompt, skip_special_tokens=True)
        return rows

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._score(batch, self._generate(batch, full=False), self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        results = self._compute(self.val_metrics)
        self._log_results("val", results)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_predictions.extend(self._score(batch, self._generate(batch, full=True), self.test_metrics))

    def on_test_epoch_start(self) -> None:
        self.test_predictions = []

    def on_test_epoch_end(self) -> None:
        self.test_results = self._compute(self.test_metrics)
        self._log_results("test", self.test_results)
        # Each rank predicted its own batches: every rank gets all rows (the writers sort them by index).
        self.test_predictions = gather_rows(self.test_predictions)

    def _compute(self, metrics: nn.ModuleDict) -> dict[str, dict]:
        # The datamodule's task list is the same on every rank; "tasks with updates" may not be, and a
        # compute() (which syncs across ranks) called on only some ranks would hang.
        dm = getattr(self.trainer, "datamodule", None)
        names = [n for n in (dm.tasks if dm is not None else metrics.keys()) if n in metrics]
        results: dict[str, dict] = {}
        for name in names:
            results.update(metrics[name].compute())
        for m in metrics.values():
            m.reset()
        return results

    def _log_results(self, prefix: str, results: dict[str, dict]) -> None:
        for key, values in results.items():
            for metric in ("precision", "recall", "f1", "parse_rate", "accuracy", "f1_weighted"):
                if metric in values:
                    self.log(f"{prefix}/{key}/{metric}", float(values[metric]), sync_dist=False)
        if results:
            self.log(f"{prefix}/f1_mean", float(mean_f1(results)), prog_bar=True, sync_dist=False)
