"""LightningDataModule: task specs -> seeded splits -> tokenized datasets -> batches."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mentalglm.config import DataConfig, as_config, to_dict
from mentalglm.data.answers import check_explained, explained_counts
from mentalglm.data.collate import GenerationCollator, PackedCollator, TrainCollator
from mentalglm.data.io import LoadReport, check_on_error
from mentalglm.data.render import META_COLUMNS, tokenize_dataset
from mentalglm.data.sampler import LengthGroupedBatchSampler, ResumableDataLoader
from mentalglm.data.splits import build_splits, save_split
from mentalglm.errors import ConfigError
from mentalglm.runtime.distributed import shard_eval_batches
from mentalglm.runtime.generation import plan_batches
from mentalglm.tasks import Task

log = logging.getLogger(__name__)

BATCHING = ("grouped", "random", "packed")


def item_key(row: Mapping) -> tuple[str, str, str]:
    """An evaluation item: ids are unique within a task's split; aspect tasks ask one post per aspect."""
    return row["task"], str(row["id"]), row.get("aspect") or ""


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
        self.has_index = "index" in ds.column_names
        self.ds = ds.with_format(None, columns=list(columns) + (["index"] if self.has_index else []))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.ds[i])
        if not self.has_index:
            item["index"] = i
        return item


class InstructionDataModule(L.LightningDataModule):
    """The splits of `tasks` (their files: `data.tasks`), tokenized for the model.

    Evaluation splits keep each item's position in the full split as `index`; `skip` (item keys) leaves items
    out of the evaluation split (those an interrupted evaluation already predicted).
    """

    def __init__(
        self,
        tokenizer,
        tasks: Mapping[str, Task],
        data: DataConfig | Mapping[str, Any],
        *,
        chat: bool,
        seed: int,
        base_template: str = "{query}\n",
        system: str | None = None,
        cache_dir: str | Path | None = None,
        split_file: str | Path | None = None,
        splits: tuple[str, ...] = ("train", "val", "test"),
        test_split: str = "test",
        shots: int = 0,
        describe: bool = False,
        val_max_pad_fraction: float | None = None,
        skip: Collection[tuple[str, str, str]] = (),
    ):
        super().__init__()
        self.data = as_config(DataConfig, data)
        d = self.data
        if d.batching not in BATCHING:
            raise ConfigError(f"data.batching must be one of {', '.join(BATCHING)}, got {d.batching!r}")
        check_on_error(d.on_error)
        missing = [t for t in tasks if t not in d.tasks]
        if missing:
            raise ConfigError(
                f"no data files configured for task(s) {missing}: add them under data.tasks "
                f"(configured: {', '.join(d.tasks) or 'none'})"
            )
        self.tokenizer = tokenizer
        self.task_defs = dict(tasks)
        self.tasks = list(tasks)
        self.chat, self.seed, self.base_template, self.system = chat, seed, base_template, system
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.split_file = Path(split_file) if split_file else None
        self.splits, self.test_split, self.shots, self.describe = tuple(splits), test_split, shots, describe
        self.val_max_pad_fraction = val_max_pad_fraction
        self.skip = set(skip)
        self.report = LoadReport()
        self.stats: dict[str, dict] = {}
        self.answer_counts: dict[str, tuple[int, int]] = {}  # train: task -> (answers, with an explanation)
        self.datasets: dict[str, datasets.Dataset] = {}
        # Gold labels only (no post text) of every split, for the majority-class baseline.
        self.gold: dict[str, list[dict]] = {}
        # Every item of each evaluation split (after limit_eval), skipped ones included: key -> position.
        self.item_index: dict[str, dict[tuple, int]] = {}
        # The gold answer of every such item (its explanation is the reference of the explanation metrics).
        self.references: dict[str, dict[tuple, str]] = {}
        self.sampler: LengthGroupedBatchSampler | None = None
        self.train_loader: ResumableDataLoader | None = None
        self._train_state: dict | None = None  # a checkpoint's loader state, applied when the loader is built

    def setup(self, stage: str | None = None) -> None:
        if self.datasets or not self.tasks:
            return
        d = self.data
        specs = {t: to_dict(d.tasks[t]) for t in self.tasks}
        splits = build_splits(
            specs,
            seed=self.seed,
            on_error=d.on_error,
            report=self.report,
            templates=to_dict(d.templates),
            tasks=self.task_defs,
            on_leak=d.on_leak,
        )
        if self.report.total_skipped:
            log.warning("skipped bad items:\n%s", self.report.summary())
        if "train" in self.splits:
            self.answer_counts = explained_counts(splits["train"], self.task_defs)
            for name in check_explained(d.name, d.answers, self.answer_counts):
                n, k = self.answer_counts[name]
                log.warning("task %s: %d of %d training answers carry no explanation", name, n - k, n)
        if self.split_file is not None:
            save_split(splits, self.split_file)
        self.gold = {
            name: [{"task": r["task"], "labels": r["labels"], "aspect": r.get("aspect") or ""} for r in rows]
            for name, rows in splits.items()
        }
        render = dict(
            chat=self.chat,
            max_length=d.max_length,
            base_template=self.base_template,
            system=self.system,
            cache_dir=self.cache_dir,
        )
        if self.shots:
            from mentalglm.data.fewshot import add_shots

            for name in self.splits:
                if name != "train":
                    splits[name] = add_shots(
                        splits[name], splits["train"], self.shots, seed=self.seed, tasks=self.task_defs
                    )
        if self.describe:  # before the shots too: description, solved examples, then the question
            from mentalglm.data.fewshot import add_descriptions

            splits = {name: add_descriptions(rows, self.task_defs) for name, rows in splits.items()}
        for name, records in splits.items():
            if not records or name not in self.splits:
                continue
            if name != "train":
                if d.limit_eval:
                    records = limit_per_task(records, int(d.limit_eval))
                self.item_index[name] = {item_key(r): i for i, r in enumerate(records)}
                self.references[name] = {item_key(r): r["answer"] for r in records}
                records = [{**r, "index": i} for i, r in enumerate(records) if item_key(r) not in self.skip]
            raw = datasets.Dataset.from_list(records) if records else None
            if raw is None:
                continue
            ds, stats = tokenize_dataset(raw, self.tokenizer, with_answer=(name == "train"), **render)
            self.datasets[name], self.stats[name] = ds, stats
            log.info(
                "%s: %d items, %d truncated, %d too long (skipped), cache %s",
                name,
                stats["n"],
                stats["n_truncated"],
                stats["n_too_long"],
                "hit" if stats.get("cache_hit") else "miss",
            )

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        d = self.data
        ds = self.datasets["train"]
        data = IndexedDataset(ds, ("input_ids", "labels"))
        lengths = [len(x) for x in ds["input_ids"]]
        collate = PackedCollator() if d.batching == "packed" else TrainCollator(self.tokenizer.pad_token_id)
        rank, world = self._rank_world()
        self.sampler = LengthGroupedBatchSampler(
            lengths,
            d.batch_size,
            bucket_batches=d.bucket_batches if d.batching == "grouped" else 1,
            shuffle=True,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
        )
        # A private generator: creating the iterator then draws nothing from the global RNG, whose state a
        # resumed run restores (RNGStateCallback) and must find where an uninterrupted run had it.
        loader = ResumableDataLoader(
            data,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=d.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )
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

    def eval_batches(self, split: str, max_pad_fraction: float | None = None) -> list[list[int]]:
        """The generation batches of an evaluation split (before sharding across ranks)."""
        lengths = [len(x) for x in self.datasets[split]["input_ids"]]
        return plan_batches(lengths, self.data.eval_batch_size, max_pad_fraction)

    def _eval_loader(self, split: str, max_pad_fraction: float | None = None) -> DataLoader:
        data = IndexedDataset(self.datasets[split], ("input_ids",) + META_COLUMNS)
        # Each rank generates its own batches (the trainers run with use_distributed_sampler=false: Lightning's
        # DistributedSampler would repeat items to even out the ranks and could not wrap this batch list).
        batches = shard_eval_batches(self.eval_batches(split, max_pad_fraction), *self._rank_world())
        return DataLoader(
            data, batch_sampler=batches, collate_fn=GenerationCollator(), num_workers=self.data.num_workers
        )

    def _rank_world(self) -> tuple[int, int]:
        """Data-parallel rank and world size: every process of the run (0 and 1 without a trainer)."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", self.val_max_pad_fraction)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_split)

    def majority_baseline(self, eval_rows: list[dict]) -> dict[str, dict]:
        """Per metric key: the metrics of always answering each task's most frequent training label set,
        scored on `eval_rows` (dicts with task, labels, aspect: e.g. the gold side of the predictions)."""
        from mentalglm.scoring.metrics import majority_baseline

        out: dict[str, dict] = {}
        for name in self.tasks:
            train = [r for r in self.gold.get("train", []) if r["task"] == name]
            rows = [r for r in eval_rows if r["task"] == name]
            out.update(majority_baseline(self.task_defs[name], train, rows))
        return out
