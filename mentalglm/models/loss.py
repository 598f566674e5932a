"""The training loss, with logits computed only where a token is supervised.

Only the answer (and its end token) carries labels: about a third of the real tokens on the paper's mix, and
none of the padding. `model(..., labels=...)` still projects every position onto the whole vocabulary (151,552
ids for GLM-4: 1.2 GFLOP forward and 0.6 MB of fp32 logits per token) and throws most of it away. Passing
`logits_to_keep` makes the model project only the positions whose next token has a label; the loss is the same
mean over supervised tokens (tests/test_performance.py checks it, and its gradient, against `labels=`).

How precisely the model can select depends on its transformers code, so `logits_selection` picks once per model:
- "mask": a boolean (batch, seq) `logits_to_keep` (models that slice with transformers' `slice_logits_to_keep`, as
  GLM does in recent 5.x releases): exactly the supervised positions of every row.
- "positions": a 1-D `logits_to_keep` (the same positions for every row): the union over the rows, exact for
  packed batches (one row) and close to it for length-grouped ones.
- "all": models whose forward has no `logits_to_keep`: the plain `labels=` loss.

At GLM-4's vocabulary even the supervised positions' logits dominate activation memory (fp32: 0.6 MB per
position, kept for backward). `model.loss_chunk_size=N` runs the decoder once, then the LM head and the
cross-entropy N positions at a time, computing each chunk's gradient right away (as Liger's fused kernel does), so
at most one chunk's logits are ever resident and nothing is recomputed: Liger's kernel where it is installed and
the model is on CUDA, this chunked PyTorch path elsewhere (a head that is not a plain linear layer, e.g. one with
LoRA, is recomputed per chunk in backward instead). Loss and gradients equal the other paths'
(tests/test_performance.py).
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mentalglm.data.render import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """What each position is trained to predict: the label one to the right (nothing after the last)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _causal_lm_class(model: nn.Module) -> type:
    """The transformers class whose forward runs (under peft and FSDP2's dynamic subclass)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for cls in type(base).__mro__:
        if "forward" in vars(cls) and not cls.__module__.startswith("torch."):
            return cls
    return type(base)


def logits_selection(model: nn.Module) -> str:
    """ "mask", "positions" or "all": see the module docstring."""
    cls = _causal_lm_class(model)
    if "logits_to_keep" not in inspect.signature(cls.forward).parameters:
        return "all"
    # The boolean-mask form arrived with the shared `slice_logits_to_keep` helper; older modeling code indexes
    # `hidden_states[:, logits_to_keep, :]`, which only understands positions.
    helper = getattr(sys.modules.get(cls.__module__), "slice_logits_to_keep", None)
    if helper is None:
        return "positions"
    try:
        understood = helper(torch.zeros(1, 2, 1), torch.tensor([[True, False]])).shape == (1, 1)
    except (IndexError, RuntimeError, TypeError):
        understood = False
    return "mask" if understood else "positions"


def supervised_positions(labels: torch.Tensor) -> int:
    """Positions whose logits the loss needs (the model FLOPs of the LM head; any more is waste)."""
    return int((next_token_targets(labels) != IGNORE_INDEX).sum())


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T + bias` against `targets`, `chunk` rows at a time; the gradients of
    hidden, weight and bias are computed in the forward pass, so a chunk's logits are freed before the next."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        n = max(1, int((targets != IGNORE_INDEX).sum()))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight, bias).float()
            valid = y != IGNORE_INDEX
            safe = y.clamp_min(0)
            total += (logits.logsumexp(-1) - logits.gather(1, safe[:, None]).squeeze(1))[valid].sum()
            dlogits = logits.softmax(-1)
            dlogits[torch.arange(len(y), device=y.device), safe] -= 1
            dlogits[~valid] = 0
            dlogits /= n
            grad_hidden[start : start + chunk] = (dlogits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += dlogits.T @ h.float()
            if grad_bias is not None:
                grad_bias += dlogits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype),
            (grad_weight * grad_output).to(w_dtype) if grad_weight is not None else None,
            (grad_bias * grad_output).to(b_dtype) if grad_bias is not None else None,
            None,
            None,
        )


def _liger_loss(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor | None:
    """Liger's fused kernel (CUDA, a plain linear head, liger-kernel installed), else None."""
    if not hidden.is_cuda or type(head) is not nn.Linear:
        return None
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)(head.weight, hidden, targets, head.bias)


def chunked_loss(model: nn.Module, batch: dict, chunk_size: int) -> torch.Tensor:
    """The supervised loss with the LM head and cross-entropy applied `chunk_size` positions at a time."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    hidden = causal.get_decoder()(**inputs, use_cache=False).last_hidden_state
    targets = next_token_targets(batch["labels"])
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    head = causal.get_output_embeddings()
    fused = _liger_loss(hidden, targets, head)
    if fused is not None:
        return fused
    if type(head) is nn.Linear:
        return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(_chunk_loss_sum, hidden[start:end], targets[start:end], head, use_reentrant=False)
    return total / max(1, targets.numel())


def supervised_loss(model: nn.Module, batch: dict, selection: str, chunk_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over the supervised tokens of `batch` (padded or packed), as `labels=` computes it."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    labels = batch["labels"]
    if chunk_size:
        return chunked_loss(model, batch, chunk_size)
    if selection == "all":
        return model(**inputs, labels=labels, use_cache=False).loss
    targets = next_token_targets(labels)
    keep = targets != IGNORE_INDEX
    if selection == "mask":
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        targets = targets[keep]
    elif selection == "positions":
        positions = keep.any(0).nonzero().flatten()
        logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits.flatten(0, 1)
        targets = targets[:, positions].flatten()
    else:
        raise ValueError(f"logits selection must be 'mask', 'positions' or 'all', got {selection!r}")
    if logits.shape[0] != targets.shape[0]:
        raise RuntimeError(
            f"{type(model).__name__} returned logits for {logits.shape[0]} positions, expected "
            f"{targets.shape[0]} (logits_to_keep={selection!r} not understood by this model)"
        )
    # fp32 like transformers' own loss: bf16 log-softmax over 150k ids loses precision.
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
