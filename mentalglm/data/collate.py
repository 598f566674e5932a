"""Batch collators: right-padded training, padding-free packed training, generation batches."""

from __future__ import annotations

import torch

from mentalglm.data.render import IGNORE_INDEX, META_COLUMNS

GENERATION_META = (*META_COLUMNS, "index", "answer")


class TrainCollator:
    """Right-pads `input_ids` (pad id), `labels` (-100) and builds `attention_mask`."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
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
    Only valid with `use_cache=False`: with the cache on, samples silently attend
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
    """Passes a generation batch through as it was planned (runtime/generation.py `plan_batches`): the prompts'
    token ids unpadded (generation pads them, once) and the record metadata as lists."""

    def __call__(self, features: list[dict]) -> dict:
        # An empty list is the batch a data-parallel rank with fewer batches than the others runs.
        batch: dict = {"prompts": [list(f["input_ids"]) for f in features]}
        for key in GENERATION_META:
            if not features or key in features[0]:
                batch[key] = [f[key] for f in features]
        return batch
