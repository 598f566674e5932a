"""The step timer of the training benchmarks (train_throughput.py, gpu_check.py): apart from _common so that the
GPU check imports no `datasets` through it."""

from __future__ import annotations

import time

import lightning as L
import torch


def sync() -> None:
    """Wait for queued GPU work, so a timestamp covers it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    """Times the steps after `warmup` (each step's optimizer update included) and keeps the losses."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = None
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync()
        self.end = time.perf_counter()
        self.losses.append(float(outputs["loss"]))
