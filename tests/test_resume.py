"""Resume after a crash: SIGKILL train.py mid-epoch, rerun with resume=true, end where an uninterrupted run ends.

Also, in-process: the training loader follows Lightning's epochs and restarts at the right batch from every
kind of checkpoint (mid-epoch, after an epoch's last batch, after validation); the resume run-directory choice.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST_DEMO, ROOT, cli_env
from lightning.pytorch.callbacks import ModelCheckpoint

from mentalglm.data.sampler import LengthGroupedBatchSampler, ResumableDataLoader
from mentalglm.runtime.resume import latest_resumable, run_dir

# Stage two alone, two epochs of 58 steps (batch 8), a checkpoint every 5 steps, LoRA dropout on so that the
# restored RNG state matters.
RESUME_RUN = [
    "experiment=demo",
    "variant=s2",
    "stages.two.max_epochs=2",
    "data.batch_size=8",
    "data.limit_eval=4",
    "generation.val_max_new_tokens=16",
    "test=false",
    "logger=csv",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "callbacks.step_checkpoint.every_n_train_steps=5",
    "lora.dropout=0.1",
]
STEPS_PER_EPOCH = 58  # ceil(460 stage-two fixture items / 8)


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "outputs" / "train").glob("*/runs/*"))


def kill_when(tmp_path: Path, cli_cache: Path, overrides: list[str], pattern: str) -> Path:
    """Start train.py, SIGKILL it as soon as a file matching `pattern` (under the outputs) exists."""
    env = cli_env(tmp_path / "outputs")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), f"paths.cache_dir={cli_cache}", *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600  # a guard against a hung child, not a timing assertion
    try:
        while not (hits := list((tmp_path / "outputs").glob(pattern))):
            if proc.poll() is not None:
                pytest.fail(
                    f"train.py ended (exit {proc.returncode}) before {pattern} appeared:\n{proc.stderr.read()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"{pattern} did not appear")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return hits[0]


def val_rows(stage_dir: Path) -> list[dict]:
    rows = []
    for metrics in sorted(stage_dir.glob("csv/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(metrics.open()) if r.get("val/f1_mean")]
    return rows


def adapter_weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(stage_dir / "best_adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(run_cli, tmp_path, cli_cache):
    ckpt = kill_when(tmp_path, cli_cache, RESUME_RUN, "train/*/runs/*/stage_two/checkpoints/last.ckpt")
    killed = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert killed["epoch"] == 0 and 0 < killed["global_step"] < STEPS_PER_EPOCH  # really mid-epoch
    (run,) = run_dirs(tmp_path)
    assert not (run / "summary.json").exists()

    resumed = run_cli("train.py", *RESUME_RUN, "resume=true")
    assert run_dirs(tmp_path) == [run]  # continued in the interrupted run's directory
    assert f"resuming from {run / 'stage_two' / 'checkpoints' / 'last.ckpt'}" in resumed.stdout

    run_cli("train.py", *RESUME_RUN)  # the same run, uninterrupted
    (reference,) = [r for r in run_dirs(tmp_path) if r != run]

    a, b = reference / "stage_two", run / "stage_two"
    last_a = torch.load(a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    last_b = torch.load(b / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last_a["global_step"] == last_b["global_step"] == 2 * STEPS_PER_EPOCH
    assert last_a["state_dict"].keys() == last_b["state_dict"].keys()
    for key in last_a["state_dict"]:
        assert torch.equal(last_a["state_dict"][key], last_b["state_dict"][key]), key
    best_a, best_b = adapter_weights(a), adapter_weights(b)
    assert best_a.keys() == best_b.keys() and all(torch.equal(best_a[k], best_b[k]) for k in best_a)

    # Validation after each epoch: the same numbers (the resumed run's are split over two CSV logs).
    rows_a, rows_b = val_rows(a), val_rows(b)
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b] == ["0", "1"]
    val_keys = [k for k in rows_a[0] if k.startswith("val/")]
    assert [[r[k] for k in val_keys] for r in rows_a] == [[r[k] for k in val_keys] for r in rows_b]
    summary_a, summary_b = (json.loads((r / "summary.json").read_text()) for r in (reference, run))
    assert summary_a["best_val_f1_mean"] == summary_b["best_val_f1_mean"]


@pytest.mark.slow
def test_resumed_full_variant_keeps_the_finished_stage_one(run_cli, tmp_path, cli_cache):
    overrides = [*FAST_DEMO, "test=false", "stages.two.max_epochs=1"]
    kill_when(tmp_path, cli_cache, overrides, "train/*/runs/*/stage_one/stage_done.json")
    (run,) = run_dirs(tmp_path)
    stage_one = run / "stage_one"
    adapter = stage_one / "best_adapter" / "adapter_model.safetensors"
    before = adapter.read_bytes(), adapter.stat().st_mtime_ns
    trained_once = sorted(p.name for p in stage_one.glob("csv/version_*"))

    proc = run_cli("train.py", *overrides, "resume=true")
    assert "stage one finished before the interruption" in proc.stdout
    assert (adapter.read_bytes(), adapter.stat().st_mtime_ns) == before  # not retrained, not re-exported
    assert sorted(p.name for p in stage_one.glob("csv/version_*")) == trained_once
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["two"]["init_adapter"] == str(stage_one / "best_adapter")


# ----------------------------------------------------------------------------- in-process: the training loader
class _Loaders(L.LightningDataModule):
    """40 items in batches of 4; the loader wired to the trainer as InstructionDataModule wires it."""

    def __init__(self):
        super().__init__()
        self.train_loader, self._state = None, None

    def train_dataloader(self):
        loader = ResumableDataLoader(
            list(range(40)), batch_sampler=LengthGroupedBatchSampler(list(range(40)), 4, bucket_batches=2, seed=1)
        )
        loader.current_epoch = lambda: self.trainer.fit_loop.epoch_progress.current.processed
        loader.consumed = lambda: self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if self._state:
            loader.load_state_dict(self._state)
        self.train_loader = loader
        return loader

    def val_dataloader(self):
        return torch.utils.data.DataLoader(list(range(8)), batch_size=4)

    def state_dict(self):
        return {"train_loader": self.train_loader.state_dict()}

    def load_state_dict(self, state):
        self._state = state["train_loader"]


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch.tolist()))
        return self.layer(batch.float().unsqueeze(-1)).sum()

    def validation_step(self, batch, batch_idx):
        self.log("score", float(self.current_epoch))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01)
        _ = self.trainer.estimated_stepping_batches  # builds and starts the train loader before any restore
        return opt


def _fit(max_epochs=3, max_steps=-1, callbacks=(), ckpt_path=None) -> _Recorder:
    model = _Recorder()
    L.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    ).fit(model, _Loaders(), ckpt_path=ckpt_path)
    return model


def test_every_epoch_sees_every_batch_in_a_new_order():
    seen = _fit().seen
    epochs = [[b for e, b in seen if e == epoch] for epoch in range(3)]
    assert [len(e) for e in epochs] == [10, 10, 10]
    assert all(sorted(i for b in e for i in b) == list(range(40)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize(
    "stop,every",
    [(13, 13), (10, 10), (20, 10), (10, None), (20, None)],
    ids=["mid-epoch", "after-last-batch", "after-last-batch-epoch-1", "after-validation", "after-validation-epoch-1"],
)
def test_resumed_loader_continues_at_the_next_batch(tmp_path, stop, every):
    full = _fit().seen
    if every:  # a step checkpoint; the run stops right after it
        cb = ModelCheckpoint(tmp_path, save_last=True, save_top_k=0, every_n_train_steps=every)
        first = _fit(max_steps=stop, callbacks=[cb]).seen
    else:  # the epoch-end checkpoint written after validation
        cb = ModelCheckpoint(tmp_path, save_last=True, monitor="score", mode="max")
        first = _fit(max_epochs=stop // 10, callbacks=[cb]).seen
    rest = _fit(ckpt_path=str(tmp_path / "last.ckpt")).seen
    assert first + rest == full


# ----------------------------------------------------------------------------- which run directory resume=true picks
def test_resume_picks_the_newest_unfinished_run_with_something_to_continue(tmp_path):
    runs = tmp_path / "runs"
    (runs / "2026-01-01_00-00-00" / "stage_one" / "checkpoints").mkdir(parents=True)
    (runs / "2026-01-01_00-00-00" / "stage_one" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (runs / "2026-01-02_00-00-00" / "stage_one" / "checkpoints").mkdir(parents=True)  # crashed before a checkpoint
    (runs / "2026-01-03_00-00-00").mkdir()
    (runs / "2026-01-03_00-00-00" / "summary.json").write_text("{}")  # finished
    assert latest_resumable(runs) == runs / "2026-01-01_00-00-00"
    assert run_dir(str(runs), "NOW", True) == str(runs / "2026-01-01_00-00-00")
    assert run_dir(str(runs), "NOW", False, "last") == str(runs / "2026-01-01_00-00-00")
    assert run_dir(str(runs), "NOW", False) == str(runs / "NOW")
    assert run_dir(str(runs), "NOW", str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    assert run_dir(str(tmp_path / "none"), "NOW", True) == str(tmp_path / "none" / "NOW")  # nothing to resume
    (runs / "2026-01-04_00-00-00").mkdir()
    (runs / "2026-01-04_00-00-00" / "predictions.partial.jsonl").write_text("")  # an interrupted evaluate.py
    assert latest_resumable(runs) == runs / "2026-01-04_00-00-00"
