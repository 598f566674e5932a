"""LightningDataModule: task specs -> seeded splits -> tokenized datasets -> batches."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mentalglm.data.collate import GenerationCollator, PackedCollator, TrainCollator
from mentalglm.data.io import LoadReport
from mentalglm.data.render import tokenize_dataset
from mentalglm.data.sampler import LengthGroupedBatchSampler, ResumableDataLoader
from mentalglm.data.splits import build_splits, save_split
from mentalglm.distributed import shard_eval_batches

log = logging.getLogger(__name__)

META_COLUMNS = ("task", "id", "labels", "aspect")


def limit_per_task(records: list[dict], n: int) -> list[dict]:
    """The first n records of each task (quick checks still see every task)."""
    seen: dict[str, int] = {}
    out = []
    for r in records:
        seen[r["task"]] = seen.get(r["task"], 0) + 1
        if seen[r["task"]] <= n:
            out.append(r)
    return out


class IndexedDataset(Dataset):
    """A tokenized split with each item's position attached, so predictions can be put back in order."""

    def __init__(self, ds: datasets.Dataset, columns: tuple[str, ...]):
        self.ds = ds.with_format(None, columns=list(columns))
        self.columns = columns

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.ds[i])
        item["index"] = i
        return item


class InstructionDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer,
        tasks: list[str],
        specs: Mapping[str, Mapping[str, Any]],
        *,
        chat: bool,
        max_length: int = 1024,
        batch_size: int = 4,
        eval_batch_size: int = 32,
        batching: str = "grouped",
        bucket_batches: int = 50,
        num_workers: int = 0,
        seed: int = 42,
        on_error: str = "raise",
        templates: Mapping[str, Any] | None = None,
        base_template: str = "{query}\n",
        system: str | None = None,
        cache_dir: str | Path | None = None,
        split_file: str | Path | None = None,
        splits: tuple[str, ...] = ("train", "val", "test"),
        test_split: str = "test",
        limit_eval: int | None = None,
        shots: int = 0,
    ):
        super().__init__()
        missing = [t for t in tasks if t not in specs]
        if missing:
            raise ValueError(f"no data files configured for task(s) {missing}: add them under data.tasks "
                             f"(configured: {', '.join(specs) or 'none'})")
        if batching not in ("grouped", "random", "packed"):
            raise ValueError(f"data.batching must be grouped, random or packed, got {batching!r}")
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.specs = {t: dict(specs[t]) for t in tasks}
        self.chat, self.max_length, self.batch_size, self.eval_batch_size = chat, max_length, batch_size, eval_batch_size
        self.batching, self.bucket_batches, self.num_workers, self.seed = batching, bucket_batches, num_workers, seed
        self.on_error, self.templates = on_error, dict(templates or {})
        self.base_template, self.system = base_template, system
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.split_file = Path(split_file) if split_file else None
        self.splits, self.test_split, self.limit_eval, self.shots = tuple(splits), test_split, limit_eval, shots
        self.report = LoadReport()
        self.stats: dict[str, dict] = {}
        self.datasets: dict[str, datasets.Dataset] = {}
        # Gold labels only (no post text) of every split, for the majority-class baseline.
        self.gold: dict[str, list[dict]] = {}
        self.sampler: LengthGroupedBatchSampler | None = None
        self.train_loader: ResumableDataLoader | None = None
        self._train_state: dict | None = None  # a checkpoint's loader state, applied when the loader is built

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = build_splits(self.specs, seed=self.seed, on_error=self.on_error, report=self.report,
                              templates=self.templates)
        if self.report.total_skipped:
            log.warning("skipped bad items:\n%s", self.report.summary())
        if self.split_file is not None:
            save_split(splits, self.split_file)
        self.gold = {name: [{"task": r["task"], "labels": r["labels"], "aspect": r.get("aspect") or ""} for r in rows]
                     for name, rows in splits.items()}
        render = dict(chat=self.chat, max_length=self.max_length, base_template=self.base_template,
                      system=self.system, cache_dir=self.cache_dir)
        if self.shots:
            from mentalglm.data.fewshot import add_shots

            for name in self.splits:
                if name != "train":
                    splits[name] = add_shots(splits[name], splits["train"], self.shots, seed=self.seed)
        for name, records in splits.items():
            if not records or name not in self.splits:
                continue
            if name != "train" and self.limit_eval:
                records = limit_per_task(records, int(self.limit_eval))
            raw = datasets.Dataset.from_list(records)
            ds, stats = tokenize_dataset(raw, self.tokenizer, with_answer=(name == "train"), **render)
            self.datasets[name], self.stats[name] = ds, stats
            log.info("%s: %d items, %d truncated, %d too long (skipped), cache %s", name, stats["n"],
                     stats["n_truncated"], stats["n_too_long"], "hit" if stats.get("cache_hit") else "miss")

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        data = IndexedDataset(ds, ("input_ids", "labels"))
        lengths = [len(x) for x in ds["input_ids"]]
        if self.batching == "packed":
            collate = PackedCollator(self.tokenizer.pad_token_id)
        else:
            collate = TrainCollator(self.tokenizer.pad_token_id)
        rank, world = self._rank_world()
        self.sampler = LengthGroupedBatchSampler(
            lengths, self.batch_size, bucket_batches=self.bucket_batches if self.batching == "grouped" else 1,
            shuffle=True, seed=self.seed, num_replicas=world, rank=rank)
        # A private generator: creating the iterator then draws nothing from the global RNG, whose state a
        # resumed run restores (RNGStateCallback) and must find where an uninterrupted run had it.
        loader = ResumableDataLoader(data, batch_sampler=self.sampler, collate_fn=collate, num_workers=self.num_workers,
                                     generator=torch.Generator().manual_seed(self.seed))
        if self.trainer is not None:
            # The epoch Lightning itself hands samplers: unlike current_epoch it is already right when a restored
            # run builds its first iterator.
            loader.current_epoch = lambda: self.trainer.fit_loop.epoch_progress.current.processed
            loader.consumed = self._batches_consumed
        if self._train_state is not None:
            loader.load_state_dict(self._train_state)
            self._train_state = None
        self.train_loader = loader
        return loader

    # Lightning would restore the loader's state itself, but only into a loader built after the checkpoint's
    # loops are loaded; configure_optimizers (estimated_stepping_batches) builds and starts it before that.
    # The datamodule's state is loaded earlier, before configure_optimizers, so it carries the sampler position.
    def state_dict(self) -> dict:
        return {"train_loader": self.train_loader.state_dict()} if self.train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._train_state = state_dict.get("train_loader")

    def _batches_consumed(self) -> int:
        """Batches of the current epoch training has used: the loop fetches ahead (and workers further
        still), so the sampler's own count runs ahead of what a checkpoint has seen."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self.datasets[split]
        data = IndexedDataset(ds, ("input_ids",) + META_COLUMNS)
        # Length-sorted batches: left padding stays short and batches finish together.
        lengths = [len(x) for x in ds["input_ids"]]
        order = sorted(range(len(ds)), key=lengths.__getitem__)
        batches = [order[i: i + self.eval_batch_size] for i in range(0, len(order), self.eval_batch_size)]
        # Each rank generates its own batches (the trainers run with use_distributed_sampler=false: Lightning's
        # DistributedSampler would repeat items to even out the ranks and could not wrap this batch list).
        batches = shard_eval_batches(batches, *self._rank_world())
        return DataLoader(data, batch_sampler=batches, collate_fn=GenerationCollator(self.tokenizer.pad_token_id),
                          num_workers=self.num_workers)

    def _rank_world(self) -> tuple[int, int]:
        """Data-parallel rank and world size: every process of the run (0 and 1 without a trainer)."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_split)

    def has_split(self, split: str) -> bool:
        return split in self.datasets

    def majority_baseline(self, eval_rows: list[dict]) -> dict[str, dict]:
        """Per metric key: the metrics of always answering each task's most frequent training label set,
        scored on `eval_rows` (dicts with task, labels, aspect: e.g. the gold side of the predictions)."""
        from mentalglm.eval.metrics import majority_baseline
        from mentalglm.tasks import get_task

        out: dict[str, dict] = {}
        for name in self.tasks:
            train = [r for r in self.gold.get("train", []) if r["task"] == name]
            rows = [r for r in eval_rows if r["task"] == name]
            out.update(majority_baseline(get_task(name, self.templates.get(name)), train, rows))
        return out
