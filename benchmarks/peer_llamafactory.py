"""One LLaMA-Factory training run for benchmarks/peers.py, inside LLaMA-Factory's own virtual environment.

    VENV/bin/python benchmarks/peer_llamafactory.py '{"model": ..., "rows": ..., "work": ..., "steps": 60, ...}'

It imports nothing from the project (the venv has LLaMA-Factory's pins, not the project's). The rows are
written as an alpaca dataset; LLaMA-Factory tokenizes them with its glm4 template and trains through its own
`run_exp`. A callback times the steps after `warmup`, a wrapper around `Trainer.training_step` counts the
non-padding tokens of every batch, and the last stdout line is the result as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

settings = json.loads(sys.argv[1])
if settings["threads"]:
    torch.set_num_threads(settings["threads"])
work = Path(settings["work"])
(work / "dataset_info.json").write_text(
    json.dumps(
        {
            "peers": {
                "file_name": settings["rows"],
                "formatting": "alpaca",
                "columns": {"prompt": "query", "response": "answer"},
            }
        }
    )
)

counted: list[int] = []
original_step = transformers.Trainer.training_step


def counting_step(self, model, inputs, *args, **kwargs):
    mask = inputs.get("attention_mask")
    counted.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
    return original_step(self, model, inputs, *args, **kwargs)


transformers.Trainer.training_step = counting_step


class Timer(TrainerCallback):
    start = end = loss = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == settings["warmup"]:
            Timer.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        Timer.end = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        Timer.loss = next((h["train_loss"] for h in reversed(state.log_history) if "train_loss" in h), None)


from llamafactory.train.tuner import run_exp  # noqa: E402 (after the wrapper, so its trainer inherits it)

lora, opt = settings["lora"], settings["optimizer"]
run_exp(
    {
        "model_name_or_path": settings["model"],
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": lora["r"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "lora_target": ",".join(lora["target_modules"]),
        "dataset": "peers",
        "dataset_dir": str(work),
        "template": "glm4",
        "cutoff_len": settings["max_length"],
        "overwrite_cache": True,
        "output_dir": str(work / "out"),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": settings["batch_size"],
        "gradient_accumulation_steps": 1,
        "max_steps": settings["steps"],
        "learning_rate": opt["lr"],
        "weight_decay": opt["weight_decay"],
        "adam_beta1": opt["betas"][0],
        "adam_beta2": opt["betas"][1],
        "lr_scheduler_type": "linear",
        "warmup_steps": max(1, round(opt["warmup_ratio"] * settings["steps"])),
        "max_grad_norm": 1.0,
        "disable_gradient_checkpointing": True,
        "flash_attn": "sdpa",
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "seed": settings["seed"],
        "logging_steps": 10**6,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "plot_loss": False,
        "dataloader_pin_memory": False,
    },
    callbacks=[Timer()],
)
print(
    json.dumps({"seconds": Timer.end - Timer.start, "tokens": sum(counted[settings["warmup"] :]), "loss": Timer.loss})
)
