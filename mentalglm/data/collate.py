"""Batch collators: right-padded training, padding-free packed training, left-padded generation."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
GENERATION_META = ("task", "id", "labels", "aspect", "index", "answer")


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


class TrainCollator:
    """Right-pads `input_ids` (pad id), `labels` (-100) and builds `attention_mask`."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = _round_up(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PackedCollator:
    """Padding-free batches: all samples of a micro-batch concatenated into one row.

    `position_ids` restart at 0 per sample and no `attention_mask` is returned, which is how transformers
    detects packed sequences and keeps samples from attending to each other (sdpa, eager, flash-attn).
    Only valid with `use_cache=False` (REFERENCE.md §7): with the cache on, samples silently attend
    to each other. The first label of every sample is -100 so no sample is trained to predict the next
    sample's first token.
    """

    def __init__(self, pad_id: int | None = None):
        self.pad_id = pad_id  # unused (nothing is padded); accepted so all train collators build alike

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, labels, position_ids = [], [], []
        for f in features:
            n = len(f["input_ids"])
            input_ids += list(f["input_ids"])
            labels += [IGNORE_INDEX] + list(f["labels"][1:])
            position_ids += range(n)
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
        }


class GenerationCollator:
    """Left-pads prompt ids for batched generation and passes record metadata through as lists."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            # The empty batch a data-parallel rank with fewer batches than the others runs (shard_eval_batches).
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone(), **{k: [] for k in GENERATION_META}}
        width = _round_up(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, width - n :] = torch.as_tensor(f["input_ids"])
            attention_mask[row, width - n :] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key in GENERATION_META:
            if key in features[0]:
                batch[key] = [f[key] for f in features]
        return batch
