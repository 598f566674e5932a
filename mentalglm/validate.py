"""Configuration checks that run before anything is loaded, each failing with one actionable line.

Without them a typo surfaces minutes later as a traceback from deep inside datasets, transformers or
Lightning (or, for 16-mixed on a CPU, not at all: Lightning silently trains in bf16 instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig

from mentalglm.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
FP16 = {"16-mixed", "16", "16-true"}
BF16 = {"bf16-mixed", "bf16", "bf16-true"}
PRECISIONS = FP16 | BF16 | {"32-true", "32", "64-true", "64", "transformer-engine", "transformer-engine-float16"}
SPLIT_KEYS = ("train", "val", "test")


# ----------------------------------------------------------------------------- command line (before Hydra)
def group_override_error(argv: Iterable[str], conf_dir: Path = CONF_DIR) -> str | None:
    """The message for a `group=option` override naming a config file that does not exist, else None.

    Hydra's own report of this spans a dozen lines and ends with a hint about HYDRA_FULL_ERROR."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        group = key.split("@", 1)[0]
        if group.startswith("hydra") or not (conf_dir / group).is_dir() or not value:
            continue
        if any(c in value for c in "([{$") or value == "null":
            continue  # sweep syntax (choice(...), range(...)) or an interpolation: Hydra's business
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        for option in value.split(","):
            if option not in options:
                hint = (" or add conf/model/NAME.yaml (model.pretrained: a hub id or local path)"
                        if group == "model" else "")
                return f"unknown {group} {option!r}: choose one of {', '.join(options)}{hint}"
    return None


# ----------------------------------------------------------------------------- composed config
def check_train_config(cfg: DictConfig, stages: list[DictConfig]) -> None:
    tasks = [t for s in stages for t in s.tasks]
    for stage in stages:
        check_tasks(cfg, list(stage.tasks), f"stage {stage.name} tasks")
    if cfg.get("test"):
        check_tasks(cfg, list(cfg.test_tasks), "test_tasks")
        tasks += list(cfg.test_tasks)
    check_data_files(cfg, tasks)
    check_model(cfg)
    check_precision(cfg.trainer)


def check_evaluate_config(cfg: DictConfig) -> None:
    check_tasks(cfg, list(cfg.tasks), "tasks")
    check_data_files(cfg, list(cfg.tasks))
    check_model(cfg)
    check_precision(cfg.trainer)


def check_tasks(cfg: DictConfig, names: list[str], where: str) -> None:
    from mentalglm.tasks import TASKS

    for name in names:
        if name not in TASKS:
            raise ConfigError(f"unknown task {name!r} in {where}; known tasks: {', '.join(TASKS)}")
        if name not in cfg.data.tasks:
            raise ConfigError(f"task {name!r} ({where}) has no data files in data={cfg.data.name}: add "
                              f"data.tasks.{name} with train/val/test paths")


def check_data_files(cfg: DictConfig, tasks: list[str]) -> None:
    """Every split file a used task names must exist (each split of a task is loaded, so all are checked)."""
    from mentalglm.data.loaders import KNOWN_SUFFIXES

    for name in dict.fromkeys(tasks):
        spec = cfg.data.tasks[name] or {}
        for split in SPLIT_KEYS:
            source = spec.get(split)
            if not source:
                continue
            path = Path(str(source))
            looks_like_file = path.suffix.lower() in KNOWN_SUFFIXES or path.is_absolute() or str(source).startswith(".")
            if looks_like_file and not path.exists():
                raise ConfigError(f"data file not found: {path} (data.tasks.{name}.{split}); put the file there, "
                                  f"or point paths.data_dir (env MENTALGLM_DATA) or data.tasks.{name}.{split} at it")


def check_model(cfg: DictConfig) -> None:
    model = cfg.model
    if model.get("tiny"):
        return
    pretrained = model.get("pretrained")
    if not pretrained:
        raise ConfigError(f"model.pretrained is empty for model {model.name}: set a Hugging Face id "
                          "(e.g. THUDM/glm-4-9b-chat-hf) or a local checkpoint directory")
    text = str(pretrained)
    local = text.startswith(("/", ".", "~")) or Path(text).expanduser().exists()
    if local and not (Path(text).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.pretrained={text} is not a model directory (no config.json there): download the "
                          "checkpoint to that path or set model.pretrained to a Hugging Face id")


def check_precision(trainer: DictConfig) -> None:
    import torch

    precision = str(trainer.get("precision"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} is not a precision Lightning knows; use one of "
                          f"{', '.join(sorted(PRECISIONS))}")
    accelerator = str(trainer.get("accelerator", "auto"))
    has_cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not has_cuda:
        raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible: use trainer=cpu "
                          "(or trainer.accelerator=cpu trainer.precision=32-true)")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not has_cuda)
    if on_cpu and precision in FP16:
        # Lightning would silently switch to bf16 here: the run would not be the fp16 run that was asked for.
        raise ConfigError(f"trainer.precision={precision} (fp16) needs a CUDA GPU and this run is on the CPU: use "
                          "trainer.precision=32-true or bf16-mixed")
    if not on_cpu and has_cuda and precision in BF16 and torch.cuda.get_device_capability() < (8, 0):
        name = torch.cuda.get_device_name()
        raise ConfigError(f"trainer.precision={precision} needs a GPU with bf16 (compute capability 8.0+); {name} "
                          "has none: use trainer.precision=16-mixed (fp16 with loss scaling, the paper's V100 setting)")
