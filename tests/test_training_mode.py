"""The model is in train mode during training steps (dropout on) and in eval mode while validating (dropout off)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from conftest import compose_config


class ModeProbe(L.Callback):
    """Records, per phase, whether every module of the wrapped model was in train mode (GLM's attention applies its
    dropout through `self.training`, LoRA through nn.Dropout layers)."""

    def __init__(self):
        self.train: list[bool] = []
        self.val: list[bool] = []

    @staticmethod
    def dropouts(pl_module) -> list:
        import torch

        return [m for m in pl_module.model.modules() if isinstance(m, torch.nn.Dropout)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(all(m.training for m in pl_module.model.modules()))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(not any(m.training for m in pl_module.model.modules()))


@pytest.mark.slow
def test_dropout_is_active_in_training_and_off_in_validation(tmp_path, cli_cache):
    from mentalglm.models.loading import load_tokenizer
    from mentalglm.runtime.builders import build_datamodule, build_module, build_tasks

    cfg = compose_config(
        ["experiment=demo", "variant=s2", f"paths.cache_dir={cli_cache}", "data.limit_eval=2", "lora.dropout=0.2"]
    )
    tasks = build_tasks(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    module = build_module(cfg, tokenizer, tasks, None)
    dm = build_datamodule(cfg, tokenizer, tasks, ["sos_hl_1k"], Path(tmp_path), splits=("train", "val"))
    probe = ModeProbe()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[probe],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert probe.dropouts(module)  # LoRA's dropout layers (and the base's attention dropout) are switched
    assert len(probe.train) == 6 and all(probe.train)  # both epochs, i.e. after a validation as well
    assert probe.val and all(probe.val)
