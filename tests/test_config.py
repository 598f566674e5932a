"""Config composition: every model x stage x variant combination composes and resolves without a download."""

import itertools

import pytest
from conftest import compose_config

from mentalglm.commands.train import plan_stages

MODELS = {"glm4": ("THUDM/glm-4-9b-hf", False), "glm4_chat": ("THUDM/glm-4-9b-chat-hf", True), "tiny_glm": (None, True)}
# IMHI as released: loneliness, T-SID and CAMS only as test sets (stage one trains on them when pooled); no SWMH
IMHI = ["dr", "dreaddit", "loneliness", "t_sid", "sad", "cams", "multiwd", "irf"]
RELEASED = ["dr", "dreaddit", "sad", "multiwd", "irf"]
C_IMHI = ["sos_hl_1k", "socialcd_3k", "cp"]


def compose_train(overrides: list[str], config_name: str = "train.yaml"):
    return compose_config(overrides, config_name)


@pytest.mark.parametrize(
    "model,chain",
    itertools.product(MODELS, ["stage=one", "stage=two", "variant=s1", "variant=s2", "variant=full", None]),
)
def test_every_combination_composes(model, chain):
    cfg = compose_train([f"model={model}"] + ([chain] if chain else []))
    pretrained, chat = MODELS[model]
    assert cfg.model.pretrained == pretrained and cfg.model.chat is chat
    assert cfg.model.trust_remote_code is False
    stages = [s.name for s in plan_stages(cfg)]
    assert (
        stages
        == {
            "stage=one": ["one"],
            "stage=two": ["two"],
            "variant=s1": ["one"],
            "variant=s2": ["two"],
            "variant=full": ["one", "two"],
            None: ["two"],
        }[chain]
    )
    for s in plan_stages(cfg):
        assert s.tasks == (RELEASED if s.name == "one" else C_IMHI)
        assert s.max_epochs == (5 if s.name == "one" else 10)
        assert s.init == ("base" if s.name == "one" or chain == "variant=s2" else "one")
    assert list(cfg.data.tasks) == C_IMHI + IMHI  # one list: the report order
    assert cfg.lora.r == 8 and cfg.lora.alpha == 32 and cfg.lora.dropout == 0.1
    assert list(cfg.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_the_paper_recipe_pools_every_imhi_task():
    cfg = compose_train(["stage=one", "data.pool=[train,val,test]", "data.val_fraction=0.1"])
    (one,) = plan_stages(cfg)
    assert one.tasks == IMHI
    assert all(list(cfg.data.tasks[t].pool) == ["train", "val", "test"] for t in IMHI)
    assert all(cfg.data.tasks[t].get("pool") is None for t in C_IMHI)  # the C-IMHI splits stay the paper's


def test_paper_training_defaults():
    cfg = compose_train(["model=glm4_chat", "stage=two"])
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.warmup_ratio == 0.01
    assert cfg.data.batch_size == 4 and cfg.trainer.accumulate_grad_batches == 8
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.max_length == 1024
    assert cfg.stages.two.init == "one" and cfg.stages.one.init == "base"
    assert cfg.callbacks.model_checkpoint.monitor == "val/f1_mean"
    assert compose_train(["trainer.precision=16-mixed"]).trainer.precision == "16-mixed"


def test_all_linear_lora_and_qlora_options():
    cfg = compose_train(["lora=all_linear", "model.quantization=4bit", "model.gradient_checkpointing=true"])
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert cfg.model.quantization == "4bit" and cfg.model.gradient_checkpointing is True


def test_any_value_overridable_and_targets_instantiable():
    cfg = compose_train(["optimizer.lr=3e-4", "lora.r=32", "data.batch_size=2", "seed=7", "stages.two.max_epochs=3"])
    assert (cfg.optimizer.lr, cfg.lora.r, cfg.data.batch_size, cfg.seed, cfg.stages.two.max_epochs) == (
        3e-4,
        32,
        2,
        7,
        3,
    )
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert all("_target_" in c for c in cfg.logger.values()) and all(
        "_target_" in c for c in cfg.callbacks.values() if c
    )


def test_demo_experiment_overrides_only_what_changes():
    cfg = compose_train(["experiment=demo"])
    assert cfg.model.name == "tiny_glm" and cfg.data.name == "fixtures" and cfg.variant == "full"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"
    assert cfg.data.max_length == 1024  # untouched defaults stay


def test_evaluate_config_composes():
    cfg = compose_train(["model=glm4_chat", "adapter=/some/adapter", "shots=3"], config_name="evaluate.yaml")
    assert cfg.model.pretrained == "THUDM/glm-4-9b-chat-hf" and cfg.shots == 3 and cfg.data.select is None


def test_early_stopping_option_monitors_val_f1_mean():
    from hydra.utils import instantiate

    cfg = compose_train(["callbacks=early_stop", "callbacks.early_stopping.patience=2"])
    cb = instantiate(cfg.callbacks.early_stopping)
    assert cb.monitor == "val/f1_mean" and cb.mode == "max" and cb.patience == 2
    assert cfg.callbacks.model_checkpoint.monitor == "val/f1_mean"


def test_packed_batching_trains_with_per_sample_attention():
    """data.batching=packed switches sdpa to sdpa_packed for training (no block-diagonal mask over a row)."""
    from mentalglm.models import packed_attention
    from mentalglm.runtime.builders import build_module
    from mentalglm.tasks import TASKS

    for batching, attn in (("packed", packed_attention.NAME), ("grouped", "sdpa")):
        cfg = compose_train(["experiment=demo", f"data.batching={batching}"])
        module = build_module(cfg, tokenizer=None, tasks={"sos_hl_1k": TASKS["sos_hl_1k"]}, init_adapter=None)
        assert module.model_cfg.attn_implementation == attn


def test_trainer_progress_bar_off_drops_the_progress_bar_callback(tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from mentalglm.runtime.builders import build_callbacks

    on = build_callbacks(compose_train(["experiment=demo"]), tmp_path)
    off = build_callbacks(compose_train(["experiment=demo", "trainer.enable_progress_bar=false"]), tmp_path)
    assert any(isinstance(c, TQDMProgressBar) for c in on)
    assert not any(isinstance(c, TQDMProgressBar) for c in off) and len(off) == len(on) - 1


@pytest.mark.parametrize(
    "model, pretrained, remote",
    [
        ("qwen2_7b_instruct", "Qwen/Qwen2-7B-Instruct", False),
        ("llama3_chinese_8b_instruct", "hfl/llama-3-chinese-8b-instruct-v3", False),
        ("baichuan2_7b_chat", "baichuan-inc/Baichuan2-7B-Chat", False),  # its own code only when the user says so
    ],
)
def test_table_5_baselines_compose_for_evaluate(model, pretrained, remote):
    cfg = compose_config([f"model={model}", "data=clinical", "paths.data_dir=/d"], "evaluate.yaml")
    assert cfg.model.pretrained == pretrained and cfg.model.trust_remote_code is remote
    assert list(cfg.data.tasks) == ["cp"] and cfg.data.tasks.cp.test == "/d/clinical/test.txt"
