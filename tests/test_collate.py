import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from mentalglm.data.collate import IGNORE_INDEX, GenerationCollator, PackedCollator, TrainCollator

FEATURES = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
    {"input_ids": [5, 6], "labels": [-100, 6]},
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
]


def test_train_collator_right_pads():
    batch = TrainCollator(pad_id=0)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 0, 0, 0], [5, 6, 7, 0, 0]]
    assert batch["labels"][1].tolist() == [-100, 6, -100, -100, -100]
    assert batch["attention_mask"].sum(1).tolist() == [5, 2, 3]


def test_generation_collator_passes_prompts_unpadded_and_metadata():
    # Generation pads once (runtime/generation.py); the collator keeps the planned batch as it is.
    feats = [
        {"input_ids": [1, 2, 3], "task": "dr", "id": "a", "labels": ["yes"], "aspect": "", "index": 0},
        {"input_ids": [4], "task": "sad", "id": "b", "labels": ["work"], "aspect": "", "index": 1},
    ]
    batch = GenerationCollator()(feats)
    assert batch["prompts"] == [[1, 2, 3], [4]] and "input_ids" not in batch
    assert batch["task"] == ["dr", "sad"] and batch["labels"] == [["yes"], ["work"]] and batch["index"] == [0, 1]


def test_packed_collator_restarts_positions():
    batch = PackedCollator()(FEATURES)
    assert batch["input_ids"].shape == (1, 10) and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2]]
    # Each sample's first label is masked so no sample learns to predict the next one's first token.
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, -100, 6, -100, 6, 7]]


def _per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Losses of the supervised tokens in row-major order (logit t predicts label t+1)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss(tiny_checkpoint, tiny_tokenizer, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    feats = []
    for n, n_prompt in ((17, 9), (5, 2), (11, 4), (8, 8 - 3)):
        ids = torch.randint(0, len(tiny_tokenizer) - 20, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    padded = TrainCollator(tiny_tokenizer.pad_token_id)(feats)
    packed = PackedCollator()(feats)
    with torch.no_grad():
        out_pad = model(**padded, use_cache=False)
        out_pack = model(**packed, use_cache=False)
    want = _per_token_losses(out_pad.logits, padded["labels"])
    got = _per_token_losses(out_pack.logits, packed["labels"])
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(out_pack.loss, out_pad.loss, atol=1e-5)
    # The test has teeth: without restarting positions the samples attend to each other.
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits
    assert not torch.allclose(_per_token_losses(leaky, packed["labels"]), want, atol=1e-3)
