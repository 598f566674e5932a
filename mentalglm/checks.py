"""Configuration checks that run before anything is loaded, each failing with one actionable line.

Without them a typo surfaces minutes later as a traceback from deep inside datasets, transformers or
Lightning (or, for 16-mixed on a CPU, not at all: Lightning silently trains in bf16 instead).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from mentalglm.data.answers import ANSWERS, label_only_error
from mentalglm.errors import ConfigError
from mentalglm.runtime.builders import trainable

FP16 = {"16-mixed", "16", "16-true"}
BF16 = {"bf16-mixed", "bf16", "bf16-true"}
PRECISIONS = FP16 | BF16 | {"32-true", "32", "64-true", "64", "transformer-engine", "transformer-engine-float16"}
SPLIT_KEYS = ("train", "val", "test")


def check_train_config(cfg: DictConfig, plans: list, tests: list[str], tasks: dict) -> None:
    check_chain_choice()
    for plan in plans:
        if not plan.tasks:
            raise ConfigError(
                f"stage {plan.name} has no tasks in data={cfg.data.name}: name it in "
                f"data.tasks.<task>.stage (or leave it out of the chain)"
            )
        for name in plan.tasks:
            spec = cfg.data.tasks[name]
            if not trainable(spec):
                raise ConfigError(
                    f"task {name!r} (stage {plan.name}) has no data files in data={cfg.data.name}: "
                    f"set data.tasks.{name}.train (and val or val_size)"
                )
            if not (spec.get("val") or spec.get("val_size") or spec.get("pool")):
                raise ConfigError(
                    f"task {name!r} (stage {plan.name}) has no validation split in "
                    f"data={cfg.data.name}: set data.tasks.{name}.val or data.tasks.{name}.val_size"
                )
    if cfg.test and not tests:
        raise ConfigError(
            f"test=true but no selected task of data={cfg.data.name} has a test file: add "
            "data.tasks.<task>.test, or set test=false"
        )
    used = list(dict.fromkeys([t for p in plans for t in p.tasks] + tests))
    check_values(cfg)
    if cfg.data.answers == "explained":  # a missing C-IMHI build: name the two ways forward, not just the file
        train = {t: Path(str(cfg.data.tasks[t].get("train") or "")) for p in plans for t in p.tasks}
        missing = [t for t, path in train.items() if not path.exists()]
        if missing and all(train[t].suffix in (".json", ".jsonl") for t in missing):
            where = sorted({str(train[t].parent) for t in missing})
            raise label_only_error(cfg.data.name, missing, f"no explanation-bearing data is in {', '.join(where)}")
    check_data_files(cfg, used)
    check_model(cfg)
    check_precision(cfg.trainer)


def check_evaluate_config(cfg: DictConfig, names: list[str]) -> None:
    if not names:
        raise ConfigError(f"no selected task of data={cfg.data.name} has a {cfg.split} file to evaluate")
    check_values(cfg)
    check_data_files(cfg, names)
    check_model(cfg)
    check_precision(cfg.trainer)


CHOICES = {
    "data.batching": ("grouped", "packed", "random"),
    "data.answers": ANSWERS,
    "data.on_error": ("raise", "skip"),
    "data.on_leak": ("warn", "error"),
    "model.dtype": ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto"),
    "model.quantization": (None, "4bit", "8bit"),
    "optimizer.scheduler": ("linear", "cosine", "constant"),
    "generation.backend": ("hf", "vllm"),
    "scores.calibration": ("temperature", "platt", "none"),
}
POSITIVE = (
    "optimizer.lr",
    "data.batch_size",
    "data.eval_batch_size",
    "data.max_length",
    "data.bucket_batches",
    "generation.max_new_tokens",
    "generation.val_max_new_tokens",
    "model.loss_chunk_size",
)


def check_values(cfg: DictConfig) -> None:
    """Values the schema's types allow but that cannot run, caught before a model is loaded."""
    from omegaconf import OmegaConf

    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            shown = ", ".join("null" if a is None else a for a in allowed)
            raise ConfigError(f"{key}={value} is not one of {shown}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    warmup = cfg.optimizer.warmup_ratio
    if not 0 <= warmup < 1:
        raise ConfigError(f"optimizer.warmup_ratio={warmup} must be in [0, 1)")
    if cfg.data.get("limit_eval") is not None and cfg.data.limit_eval <= 0:
        raise ConfigError(f"data.limit_eval={cfg.data.limit_eval} must be positive (or null)")
    if OmegaConf.select(cfg, "validation.mode") not in (None, "generate", "likelihood"):
        raise ConfigError(f"validation.mode={cfg.validation.mode} is not one of generate, likelihood")
    if not 0 < cfg.scores.sensitivity <= 1:
        raise ConfigError(f"scores.sensitivity={cfg.scores.sensitivity} must be in (0, 1]")
    if cfg.scores.enabled and cfg.generation.backend != "hf":
        raise ConfigError(
            "scores.enabled=true needs generation.backend=hf: label likelihoods come from the model's own forward "
            "(the vLLM backend returns generated text only)"
        )


def check_chain_choice() -> None:
    """`stage=` and `variant=` both set the chain of stages: choosing both would run only one of them."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    choices = HydraConfig.get().runtime.choices
    if choices.get("stage") not in (None, "null") and choices.get("variant") not in (None, "null"):
        raise ConfigError(
            f"stage={choices['stage']} and variant={choices['variant']} both choose the stages to "
            "run: give one (with experiment=demo, which sets variant=full, drop it with '~variant')"
        )


def check_data_files(cfg: DictConfig, tasks: list[str]) -> None:
    """Every split file a used task names must exist (each split of a task is loaded, so all are checked)."""
    from mentalglm.data.formats import KNOWN_SUFFIXES

    for name in dict.fromkeys(tasks):
        spec = cfg.data.tasks[name] or {}
        for split in SPLIT_KEYS:
            source = spec.get(split)
            if not source:
                continue
            path = Path(str(source))
            looks_like_file = path.suffix.lower() in KNOWN_SUFFIXES or path.is_absolute() or str(source).startswith(".")
            if looks_like_file and not path.exists():
                raise ConfigError(
                    f"data file not found: {path} (data.tasks.{name}.{split}); put the file there, "
                    f"or point paths.data_dir (env MENTALGLM_DATA) or data.tasks.{name}.{split} at it"
                )


def check_model(cfg: DictConfig) -> None:
    model = cfg.model
    if model.get("tiny") is not None:
        return
    pretrained = model.get("pretrained")
    if not pretrained:
        raise ConfigError(
            f"model.pretrained is empty for model {model.name}: set a Hugging Face id "
            "(e.g. THUDM/glm-4-9b-chat-hf) or a local checkpoint directory"
        )
    text = str(pretrained)
    local = text.startswith(("/", ".", "~")) or Path(text).expanduser().exists()
    if local and not (Path(text).expanduser() / "config.json").is_file():
        raise ConfigError(
            f"model.pretrained={text} is not a model directory (no config.json there): download the "
            "checkpoint to that path or set model.pretrained to a Hugging Face id"
        )


def check_precision(trainer: DictConfig) -> None:
    import torch

    precision = str(trainer.get("precision"))
    if precision not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} is not a precision Lightning knows; use one of "
            f"{', '.join(sorted(PRECISIONS))}"
        )
    accelerator = str(trainer.get("accelerator", "auto"))
    has_cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not has_cuda:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible: use trainer=cpu "
            "(or trainer.accelerator=cpu trainer.precision=32-true)"
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not has_cuda)
    if on_cpu and precision in FP16:
        # Lightning would silently switch to bf16 here: the run would not be the fp16 run that was asked for.
        raise ConfigError(
            f"trainer.precision={precision} (fp16) needs a CUDA GPU and this run is on the CPU: use "
            "trainer.precision=32-true or bf16-mixed"
        )
    if not on_cpu and has_cuda and precision in BF16 and torch.cuda.get_device_capability() < (8, 0):
        name = torch.cuda.get_device_name()
        raise ConfigError(
            f"trainer.precision={precision} needs a GPU with bf16 (compute capability 8.0+); {name} "
            "has none: use trainer.precision=16-mixed (fp16 with loss scaling, the paper's V100 setting)"
        )
