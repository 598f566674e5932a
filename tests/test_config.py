"""Config composition: every model x stage x variant combination composes and resolves without a download."""

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from mentalglm.pipeline import plan_stages

CONF = str(Path(__file__).resolve().parents[1] / "conf")
MODELS = {"glm4": ("THUDM/glm-4-9b-hf", False), "glm4_chat": ("THUDM/glm-4-9b-chat-hf", True),
          "tiny_glm": (None, True)}
IMHI = ["dr", "dreaddit", "loneliness", "swmh", "t_sid", "sad", "cams", "multiwd", "irf"]
C_IMHI = ["sos_hl_1k", "socialcd_3k", "cp"]


def compose_train(overrides: list[str], config_name: str = "train.yaml"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        OmegaConf.set_readonly(cfg.hydra, False)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = "/tmp/mentalglm-compose"
            cfg.hydra.runtime.cwd = str(Path(CONF).parent)
        HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.resolve(cfg)
        return cfg


@pytest.mark.parametrize("model,stage,variant", itertools.product(MODELS, ["one", "two"], ["s1", "s2", "full", None]))
def test_every_combination_composes(model, stage, variant):
    overrides = [f"model={model}", f"stage={stage}"] + ([f"variant={variant}"] if variant else [])
    cfg = compose_train(overrides)
    pretrained, chat = MODELS[model]
    assert cfg.model.pretrained == pretrained and cfg.model.chat is chat
    assert cfg.model.get("trust_remote_code", False) is False
    stages = [s.name for s in plan_stages(cfg)]
    assert stages == {"s1": ["one"], "s2": ["two"], "full": ["one", "two"], None: [stage]}[variant]
    for s in plan_stages(cfg):
        assert list(s.tasks) == (IMHI if s.name == "one" else C_IMHI)
        assert s.max_epochs == (5 if s.name == "one" else 10)
    assert set(cfg.data.tasks) >= set(IMHI + C_IMHI)
    assert cfg.lora.r == 8 and cfg.lora.alpha == 32 and cfg.lora.dropout == 0.1
    assert list(cfg.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_paper_training_defaults():
    cfg = compose_train(["model=glm4_chat", "stage=two"])
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.warmup_ratio == 0.01
    assert cfg.data.batch_size == 4 and cfg.trainer.accumulate_grad_batches == 8
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.max_length == 1024
    assert cfg.stages.two.init_from == "one" and cfg.stages.one.init_from is None
    assert cfg.callbacks.model_checkpoint.monitor == "val/f1_mean"
    assert compose_train(["trainer.precision=16-mixed"]).trainer.precision == "16-mixed"


def test_all_linear_lora_and_qlora_options():
    cfg = compose_train(["lora=all_linear", "model.quantization=4bit", "model.gradient_checkpointing=true"])
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert cfg.model.quantization == "4bit" and cfg.model.gradient_checkpointing is True


def test_any_value_overridable_and_targets_instantiable():
    cfg = compose_train(["optimizer.lr=3e-4", "lora.r=32", "data.batch_size=2", "seed=7", "stages.two.max_epochs=3"])
    assert (cfg.optimizer.lr, cfg.lora.r, cfg.data.batch_size, cfg.seed, cfg.stages.two.max_epochs) == (3e-4, 32, 2, 7, 3)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert all("_target_" in c for c in cfg.logger.values()) and all("_target_" in c for c in cfg.callbacks.values() if c)


def test_demo_experiment_overrides_only_what_changes():
    cfg = compose_train(["experiment=demo"])
    assert cfg.model.name == "tiny_glm" and cfg.data.name == "fixtures" and cfg.variant.name == "full"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"
    assert cfg.data.max_length == 1024  # untouched defaults stay


def test_evaluate_config_composes():
    cfg = compose_train(["model=glm4_chat", "adapter=/some/adapter", "shots=3"], config_name="evaluate.yaml")
    assert cfg.model.pretrained == "THUDM/glm-4-9b-chat-hf" and cfg.shots == 3 and list(cfg.tasks) == C_IMHI


def test_early_stopping_option_monitors_val_f1_mean():
    from hydra.utils import instantiate

    cfg = compose_train(["callbacks=early_stop", "callbacks.early_stopping.patience=2"])
    cb = instantiate(cfg.callbacks.early_stopping)
    assert cb.monitor == "val/f1_mean" and cb.mode == "max" and cb.patience == 2
    assert cfg.callbacks.model_checkpoint.monitor == "val/f1_mean"


def test_packed_batching_trains_with_per_sample_attention():
    """data.batching=packed switches sdpa to sdpa_packed for training (no block-diagonal mask over a row)."""
    from mentalglm.models import packed_attention
    from mentalglm.pipeline import build_module

    for batching, attn in (("packed", packed_attention.NAME), ("grouped", "sdpa")):
        cfg = compose_train(["experiment=demo", f"data.batching={batching}"])
        module = build_module(cfg, tokenizer=None, tasks=["sos_hl_1k"], init_adapter=None)
        assert module.hparams.model["attn_implementation"] == attn


def test_trainer_progress_bar_off_drops_the_progress_bar_callback(tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from mentalglm.pipeline import build_callbacks

    on = build_callbacks(compose_train(["experiment=demo"]), tmp_path)
    off = build_callbacks(compose_train(["experiment=demo", "trainer.enable_progress_bar=false"]), tmp_path)
    assert any(isinstance(c, TQDMProgressBar) for c in on)
    assert not any(isinstance(c, TQDMProgressBar) for c in off) and len(off) == len(on) - 1
