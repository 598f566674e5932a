"""Length-grouped batching: batches of similar length (little padding) in a random order (still SGD)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffle indices, cut them into mega-buckets of `bucket_batches` micro-batches, sort each bucket by
    length into micro-batches, then shuffle the order of all micro-batches.

    Sorting only within random buckets keeps batch composition random across epochs; shuffling the batch
    order keeps long and short batches interleaved. `shuffle=False` sorts the whole set (evaluation).
    The order depends only on (seed, epoch): call `set_epoch` each epoch. `state_dict()` records how many
    batches of the current epoch were handed out, so a resumed run skips them (a DataLoader prefetches
    ahead of training: for an exact resume pass the number of batches actually consumed as `position`).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        bucket_batches: int = 50,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if isinstance(lengths, Sampler):
            # What Lightning does to a batch sampler when use_distributed_sampler=True: it would pass its
            # DistributedSampler as `lengths` and silently train on wrong batches.
            raise TypeError(
                "LengthGroupedBatchSampler shards batches itself (num_replicas/rank): run the Trainer "
                "with use_distributed_sampler=false, as conf/trainer/*.yaml do"
            )
        if batch_size < 1 or bucket_batches < 1:
            raise ValueError("batch_size and bucket_batches must be >= 1")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.bucket_batches = bucket_batches
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out (by this rank)
        # Data parallel: every rank draws the same epoch order and takes batches rank, rank + n, ...
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.position = 0
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """All micro-batches of the current epoch, in order."""
        n = len(self.lengths)
        if not self.shuffle:
            # Longest first: an out-of-memory shows up on the first batch, not at the end.
            order = sorted(range(n), key=lambda i: (-int(self.lengths[i]), i))
            return self._chunk(order)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(n, generator=g)
        bucket = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, n, bucket):
            idx = perm[start : start + bucket]
            idx = idx[torch.argsort(self.lengths[idx], descending=True, stable=True)]
            batches += self._chunk(idx.tolist())
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def _chunk(self, order: list[int]) -> list[list[int]]:
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches

    def rank_batches(self) -> list[list[int]]:
        """This rank's micro-batches of the current epoch (all of them in a single process)."""
        from mentalglm.runtime.distributed import shard_train_batches

        batches = self.batches()
        return batches if self.num_replicas == 1 else shard_train_batches(batches, self.rank, self.num_replicas)

    def __iter__(self):
        batches = self.rank_batches()
        start = self.position
        for i in range(start, len(batches)):
            self.position = i + 1
            yield batches[i]
        self.position = 0  # epoch finished: a new iteration starts from the beginning

    def __len__(self) -> int:
        n = len(self.lengths)
        if not self.drop_last:
            total = math.ceil(n / self.batch_size)
        else:
            # Only the last bucket can hold a short batch; without shuffle there is a single "bucket".
            total = n // self.batch_size
        return math.ceil(total / self.num_replicas)  # shard_train_batches pads every rank to this

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `LengthGroupedBatchSampler` that follows the trainer's epoch and that Lightning
    treats as stateful.

    Lightning calls `set_epoch` only on a loader's `sampler` and `batch_sampler.sampler`, never on the batch
    sampler itself, and stops reading at the loader's length without exhausting it: so `__iter__` sets the
    epoch from `current_epoch` (else every epoch would replay epoch 0's order, and every other epoch would
    find the sampler already at its end). Having `state_dict`/`load_state_dict`, the sampler's position goes
    into every checkpoint and is loaded back when a run restarts mid-epoch, so the batches already trained on
    are skipped instead of the epoch starting over. `consumed` reports the batches training has actually
    used; without it the sampler's own count is saved, which runs ahead by whatever was prefetched.
    Both callables are set by the datamodule, which knows the trainer.
    """

    current_epoch: Callable[[], int] | None = None
    consumed: Callable[[], int] | None = None

    def __iter__(self):
        if self.current_epoch is not None:
            # Never back: a checkpoint written after an epoch's last batch has moved the sampler on to the next
            # epoch (load_state_dict) while Lightning, until its loops reset, still reports the finished one.
            self.batch_sampler.set_epoch(max(self.current_epoch(), self.batch_sampler.epoch))
        return super().__iter__()

    def state_dict(self) -> dict:
        state = self.batch_sampler.state_dict()
        if self.consumed is not None:
            state["position"] = int(self.consumed())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)
        if self.batch_sampler.position >= len(self.batch_sampler):
            # Saved after the epoch's last batch: Lightning goes on with the next epoch, from its start.
            self.batch_sampler.set_epoch(self.batch_sampler.epoch + 1)


def padding_stats(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Fraction of processed (padded) tokens that are real tokens."""
    real = sum(lengths[i] for b in batches for i in b)
    processed = sum(max(lengths[i] for i in b) * len(b) for b in batches if len(b))
    return real / processed if processed else 1.0
