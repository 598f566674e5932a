"""`sdpa_packed`: padding-free packed rows without paying for a block-diagonal mask.

For a packed training row (`PackedCollator`: one row, `position_ids` restarting at 0 for each sample)
transformers hands sdpa a block-diagonal mask over the whole row: correct, but every row then costs the
full (sum of lengths)^2 attention square, four samples' worth of it at micro-batch 4. `sdpa_packed` runs
causal sdpa on each sample's span instead, which is what FlashAttention-2's varlen kernels do on GPUs
(there, `model.attn_implementation=flash_attention_2` is the better choice). Anything else (padded
batches, generation with the KV cache, rows that are not packed) goes to transformers' own sdpa unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_packed"


def packed_spans(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """[(start, end), ...] of the samples in one packed row, or None when the input is not one packed row."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    if pos.numel() != length or int(pos[0]) != 0:
        return None
    restarts = pos[1:] == 0
    if not bool(restarts.any()) or not bool((restarts | (pos[1:] - pos[:-1] == 1)).all()):
        return None  # a single sample (plain causal sdpa is as fast) or positions that are not 0..n-1 runs
    starts = [0] + (restarts.nonzero().flatten() + 1).tolist()
    return list(zip(starts, starts[1:] + [length]))


# Every layer of one forward gets the same position_ids tensor: find its spans once, not once per layer (each
# lookup reads the tensor back to the host). The reference held here keeps the identity check sound.
_last: tuple[torch.Tensor | None, int, list[tuple[int, int]] | None] = (None, 0, None)


def _spans_once(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    global _last
    if position_ids is None or _last[0] is not position_ids or _last[1] != length:
        _last = (position_ids, length, packed_spans(position_ids, length))
    return _last[2]


def sdpa_packed_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    spans = _spans_once(kwargs.get("position_ids"), query.shape[2]) if query.shape[2] == key.shape[2] else None
    if spans is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # split, not slicing: a slice's backward writes into a zero-filled full-size gradient, once per sample.
    sizes = [b - a for a, b in spans]
    dropout = dropout if module.training else 0.0
    out = torch.cat(
        [
            F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling)
            for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


def attention_for(batching: str, attn_implementation: str | None) -> str | None:
    """The attention training uses with `data.batching`: packed rows get `sdpa_packed` in place of sdpa."""
    return NAME if batching == "packed" and attn_implementation == "sdpa" else attn_implementation


def register() -> None:
    """Make `attn_implementation="sdpa_packed"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, sdpa_packed_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
