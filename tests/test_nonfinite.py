"""Non-finite loss guard: a NaN/inf loss skips the step (counted, logged), a run of them stops training with the
cause and the remedy, and no checkpoint holding non-finite adapter weights is ever written.

The real module, datamodule and callbacks (built by the pipeline from the demo config) on the tiny GLM; the
non-finite loss is injected by a forward hook on the model, as fp16 overflow would produce it.
"""

import lightning as L
import pytest
import torch
from conftest import compose_config

from mentalglm.models.loading import load_tokenizer
from mentalglm.models.module import NonFiniteLossError
from mentalglm.runtime.builders import build_datamodule, build_module, build_tasks
from mentalglm.runtime.callbacks import StepCheckpoint


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    out = tmp_path_factory.mktemp("nonfinite")
    return compose_config(
        [
            "experiment=demo",
            "variant=s2",
            "data.select=[cp]",
            "data.batch_size=8",
            f"paths.cache_dir={out / 'cache'}",
            "callbacks.progress_bar=null",
            "callbacks.lr_monitor=null",
            "callbacks.throughput=null",
            "trainer.enable_progress_bar=false",
            "+trainer.limit_val_batches=0",
            "+trainer.limit_train_batches=8",
            "max_bad_steps=3",
        ],
        output_dir=out,
    )


def build(cfg, tmp_path):
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    tasks = build_tasks(cfg)
    dm = build_datamodule(cfg, tokenizer, tasks, ["cp"], tmp_path, splits=("train", "val"))
    return dm, build_module(cfg, tokenizer, {"cp": tasks["cp"]}, None)


class InjectNonFinite(L.Callback):
    """Makes the model's loss NaN (or inf) on the given training batches, through a forward hook."""

    def __init__(self, batches, value=float("nan")):
        self.batches, self.value, self.batch_idx = set(batches), value, -1

    def on_fit_start(self, trainer, pl_module):
        pl_module.model.register_forward_hook(self._hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_idx = batch_idx

    def _hook(self, module, args, output):
        if module.training and self.batch_idx in self.batches:
            output.logits = output.logits * self.value  # the loss is computed from these
        return output


class Snapshots(L.Callback):
    """The trainable weights after every training batch."""

    def __init__(self):
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad})


def fit(cfg, tmp_path, callbacks, max_epochs=1):
    dm, module = build(cfg, tmp_path)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="32-true",
        max_epochs=max_epochs,
        logger=False,
        callbacks=callbacks,
        limit_val_batches=0,
        limit_train_batches=8,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_skips_the_step_and_is_counted(cfg, tmp_path):
    snaps = Snapshots()
    trainer, module = fit(cfg, tmp_path, [InjectNonFinite({2}), InjectNonFinite({3}, float("inf")), snaps])
    after = snaps.after
    assert not changed(after[1], after[2]) and not changed(after[2], after[3])  # NaN and inf steps: no update
    assert changed(after[0], after[1]) and changed(after[3], after[4])  # the others train
    assert module.bad_steps_total == 2 and module.bad_steps == 0  # consecutive count reset by a good step
    assert trainer.logged_metrics["train/non_finite_steps"] == 2
    assert all(torch.isfinite(p).all() for p in after[-1].values())


def test_consecutive_non_finite_losses_stop_with_cause_and_remedy(cfg, tmp_path):
    snaps = Snapshots()
    with pytest.raises(NonFiniteLossError) as err:
        fit(cfg, tmp_path, [InjectNonFinite({1, 2, 3, 4, 5}), snaps])
    message = str(err.value)
    assert "3 consecutive non-finite losses" in message  # max_bad_steps=3
    assert "fp16 overflow" in message and "bf16-mixed" in message and "lower optimizer.lr" in message
    assert len(snaps.after) == 3  # batches 0, 1, 2: stopped at the third bad one in a row


class CorruptWeights(L.Callback):
    """Simulates weights gone non-finite (an overflowing update) after the given optimizer step."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            name, param = next((n, p) for n, p in pl_module.model.named_parameters() if "lora_B" in n)
            with torch.no_grad():
                param[0, 0] = float("nan")


def test_no_checkpoint_with_non_finite_weights_is_written(cfg, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    # Lightning runs checkpoint callbacks last, so the corruption lands before step 4's save.
    saver = StepCheckpoint(every_n_train_steps=2, dirpath=ckpt_dir)
    with pytest.raises(NonFiniteLossError, match="adapter weights became non-finite at step 4.*refusing"):
        fit(cfg, tmp_path, [CorruptWeights(4), saver])
    saved = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2  # the last good checkpoint is still there, untouched
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert saved["mentalglm"]["non_finite_steps"] == 0


def test_save_checkpoint_refuses_non_finite_weights(cfg, tmp_path):
    trainer, module = fit(cfg, tmp_path, [])
    good = tmp_path / "good.ckpt"
    trainer.save_checkpoint(good)
    with torch.no_grad():
        next(p for n, p in module.model.named_parameters() if "lora_A" in n).fill_(float("inf"))
    with pytest.raises(NonFiniteLossError):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()
    assert torch.load(good, map_location="cpu", weights_only=True)["state_dict"]
