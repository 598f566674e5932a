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
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

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


def supervised_loss(model: nn.Module, batch: dict, selection: str) -> torch.Tensor:
    """Mean cross-entropy over the supervised tokens of `batch` (padded or packed), as `labels=` computes it."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    labels = batch["labels"]
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
