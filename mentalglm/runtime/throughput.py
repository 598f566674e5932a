"""What a batch holds (samples, real tokens) and how many model FLOPs training on it takes.

Used by Lightning's `ThroughputMonitor` (conf/callbacks/default.yaml: `batch_size_fn`, `length_fn`, and the
module's `flops_per_batch` for MFU) and by the benchmarks. Padded and packed batches are both understood:
padded rows carry an `attention_mask`; packed rows carry `position_ids` that restart at 0 per sample;
generation batches carry their unpadded `prompts`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def process_age() -> float | None:
    """Seconds since this process started (Linux), e.g. for the time from `python train.py` to the first step."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def sample_lengths(batch: dict) -> list[int]:
    """Real (non-pad) length of every sample in a training or generation batch."""
    if "prompts" in batch:  # a generation batch: unpadded prompts
        return [len(p) for p in batch["prompts"]]
    if "attention_mask" in batch:
        return [int(n) for n in batch["attention_mask"].sum(dim=1).tolist()]
    if "position_ids" in batch:
        lengths = []
        for row in batch["position_ids"]:
            starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
            lengths += [b - a for a, b in zip(starts, starts[1:])]
        return lengths
    ids = batch["input_ids"]
    return [ids.shape[1]] * ids.shape[0]


def batch_samples(batch: dict) -> int:
    """Number of samples (a packed row holds several)."""
    if "prompts" in batch:
        return len(batch["prompts"])
    if "attention_mask" not in batch and "position_ids" in batch:
        return int((batch["position_ids"] == 0).sum())
    return int(batch["input_ids"].shape[0])


def real_tokens(batch: dict) -> int:
    """Tokens that are not padding: what `items_per_sec` counts, so padding never inflates it."""
    if "prompts" in batch:
        return sum(len(p) for p in batch["prompts"])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


@dataclass(frozen=True)
class FlopSpec:
    """Matmul parameter counts and attention shape of a (LoRA-wrapped) causal LM."""

    frozen: int  # weights of frozen nn.Linear layers (the LM head included, the embedding lookup not)
    trainable: int  # weights of trainable nn.Linear layers (LoRA A/B)
    layers: int
    attn_width: int  # num_attention_heads * head_dim
    head: int = 0  # weights of the (frozen) LM head, part of `frozen`

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> FlopSpec:
        frozen = trainable = 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                if module.weight.requires_grad:
                    trainable += module.weight.numel()
                else:
                    frozen += module.weight.numel()
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head = out.weight.numel() if isinstance(out, torch.nn.Linear) and not out.weight.requires_grad else 0
        return cls(frozen, trainable, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim, head)

    def forward_flops(self, n: int) -> int:
        """One sample of n tokens: 2 FLOPs per weight per token, plus QK^T and AV over the full n x n
        square (the PaLM / `torch.utils.flop_counter` convention, not halved for the causal mask)."""
        return 2 * n * (self.frozen + self.trainable) + 4 * self.layers * n * n * self.attn_width

    def train_flops(self, lengths: list[int], logit_positions: int | None = None) -> int:
        """Forward + backward model FLOPs of one training batch, counting real tokens only.

        Frozen weights need no weight gradient, so their backward is one matmul (the input gradient):
        4 FLOPs per weight per token instead of the full-fine-tuning 6. Padding and the extra forward
        of gradient checkpointing are not model FLOPs, so they lower MFU instead of inflating it.
        `logit_positions`: positions whose logits the loss needs (the supervised ones: mentalglm/models/loss.py
        projects only those); None = every real token.
        """
        body = self.frozen - self.head
        total = 0
        for n in lengths:
            total += 4 * n * body + 6 * n * self.trainable + 12 * self.layers * n * n * self.attn_width
        heads = sum(lengths) if logit_positions is None else logit_positions
        return total + 4 * heads * self.head
