"""Lightning callbacks for exact resumption."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint


class RNGStateCallback(L.Callback):
    """Save the global RNG state with each checkpoint; on resume, restore it right before the next training batch.

    Lightning checkpoints hold no RNG state, so a resumed run would draw different LoRA-dropout masks than an
    uninterrupted one. Restoring in `load_state_dict` would be too early: building the model and creating the
    data iterators draw from the same generators in between. Between a checkpoint written after batch k and
    batch k+1 an uninterrupted run draws nothing, so batch k+1 is where the state is put back.
    States are stored as tensors and plain numbers so checkpoints load with `weights_only=True`.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, state, py_gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "gauss": float(gauss),
            },
            "python": {"version": version, "state": list(state), "gauss": py_gauss},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class StepCheckpoint(ModelCheckpoint):
    """Crash safety: `last.ckpt` every `every_n_train_steps` optimizer steps and after every validation.

    Not after an epoch's last batch: a checkpoint from between that batch and the epoch's validation resumes
    past the validation (Lightning counts the epoch as finished), so the best-checkpoint choice would never
    see the epoch's score; the save after validation covers that point instead. (The monitored best-model
    callback updates last.ckpt only when the score improves.)
    """

    def __init__(self, every_n_train_steps: int, **kwargs: Any):
        kwargs = {"monitor": None, "save_top_k": 0, "save_last": True, "enable_version_counter": False, **kwargs}
        super().__init__(every_n_train_steps=every_n_train_steps, **kwargs)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written under a temporary name beside their final one and renamed into place. Lightning stages a
    local checkpoint in the system's temporary directory and moves it; across filesystems that move is a copy, and a
    full disk left a half-written last.ckpt that resume=true could not read. Here the previous one stays whole."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        import io

        from mentalglm.fileio.atomic import write_atomic

        if "://" in str(path):  # a remote filesystem: Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialised first, so a write error is the one the disk gave
        write_atomic(path, buffer.getvalue())  # a full disk: one OutputError naming the checkpoint
