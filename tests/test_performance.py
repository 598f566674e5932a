"""Fast batches must not change the loss; throughput counters and FLOPs must count the right things;
validation's early stop must not change any parsed label. (No timings here: see benchmarks/.)"""

import csv
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from mentalglm.data.collate import IGNORE_INDEX, PackedCollator, TrainCollator
from mentalglm.data.loaders import load_records
from mentalglm.data.paths import FIXTURES_DIR
from mentalglm.data.render import encode_example
from mentalglm.data.sampler import LengthGroupedBatchSampler
from mentalglm.models import packed_attention
from mentalglm.models.loss import logits_selection, supervised_loss, supervised_positions
from mentalglm.runtime.generation import cut_at_stop_strings
from mentalglm.runtime.throughput import FlopSpec, batch_samples, real_tokens, sample_lengths
from mentalglm.scoring.parsing import parse_labels
from mentalglm.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


@pytest.fixture(scope="module")
def features(tiny_hf_tokenizer):
    """Rendered training items of mixed lengths (C-IMHI label-only and IMHI answers with explanations)."""
    records = load_records(None, FIXTURES_DIR / "sos_hl_1k/suicide_train_LLM.csv")[:12]
    records += load_records("dr", FIXTURES_DIR / "imhi/dr/train.csv")[:12]
    out = []
    for r in records:
        enc = encode_example(tiny_hf_tokenizer, r, chat=True, max_length=256)
        out.append({"input_ids": enc["input_ids"], "labels": enc["labels"]})
    return out


def grouped_batch(features, size=4):
    """The first micro-batch of a length-grouped epoch over `features`."""
    lengths = [len(f["input_ids"]) for f in features]
    batch = next(iter(LengthGroupedBatchSampler(lengths, size, bucket_batches=50, seed=3)))
    return [features[i] for i in batch]


def token_losses(logits, labels):
    """Per supervised token, row-major (logit t predicts label t+1)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")


def unpadded_token_losses(model, feats):
    """Each sample alone: no padding, no neighbours."""
    out = []
    for f in feats:
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        with torch.no_grad():
            out.append(token_losses(model(input_ids=ids, use_cache=False).logits, labels))
    return torch.cat(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager", packed_attention.NAME])
def test_grouped_and_packed_losses_equal_unpadded(tiny_checkpoint, tiny_hf_tokenizer, features, attn):
    packed_attention.register()
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=attn).eval()
    # A mixed-length batch (lots of padding) and a length-grouped one: both must match the samples alone.
    for feats in (features[::6], grouped_batch(features)):
        want = unpadded_token_losses(model, feats)
        padded = TrainCollator(tiny_hf_tokenizer.pad_token_id)(feats)
        packed = PackedCollator()(feats)
        with torch.no_grad():
            out_pad = model(**padded, use_cache=False)
            out_pack = model(**packed, use_cache=False)
        torch.testing.assert_close(token_losses(out_pad.logits, padded["labels"]), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(token_losses(out_pack.logits, packed["labels"]), want, atol=1e-5, rtol=1e-4)
        # The batch loss the trainer optimises is the mean over supervised tokens in every layout.
        torch.testing.assert_close(out_pad.loss, want.mean(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_pack.loss, want.mean(), atol=1e-5, rtol=1e-5)


def test_module_training_step_loss_is_layout_independent(tiny_checkpoint, tiny_hf_tokenizer, features):
    from mentalglm.models.module import MentalGLMModule

    torch.manual_seed(0)
    module = MentalGLMModule(
        model={"name": "t", "pretrained": str(tiny_checkpoint), "dtype": "float32"},
        lora=LORA,
        optimizer={"lr": 1e-3},
        generation={},
        tasks=["sos_hl_1k"],
        tokenizer=tiny_hf_tokenizer,
    )
    module.configure_model()
    feats = grouped_batch(features)
    padded = TrainCollator(tiny_hf_tokenizer.pad_token_id)(feats)
    packed = PackedCollator()(feats)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer only warns
        a = module.training_step(padded, 0)
        b = module.training_step(packed, 0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, unpadded_token_losses(module.model, feats).mean(), atol=1e-5, rtol=1e-5)


def test_batch_counters_for_padded_and_packed(features):
    feats = features[::6]
    n = [len(f["input_ids"]) for f in feats]
    padded = TrainCollator(pad_id=0)(feats)
    packed = PackedCollator()(feats)
    assert padded["input_ids"].numel() > sum(n)  # there is padding to leave out
    for batch in (padded, packed):
        assert sample_lengths(batch) == n
        assert batch_samples(batch) == len(feats)
        assert real_tokens(batch) == sum(n)


def test_flops_match_torch_flop_counter(tiny_checkpoint):
    from torch.utils.flop_counter import FlopCounterMode

    from mentalglm.models.loading import apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    model = apply_lora(model, LORA)
    spec = FlopSpec.from_model(model)
    assert spec.trainable > 0 and spec.frozen > 10 * spec.trainable
    ids = torch.randint(0, 100, (2, 37))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert fc.get_total_flops() == 2 * spec.forward_flops(37)
    with FlopCounterMode(display=False) as fc:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    # The formula also counts input gradients of the first layer's q/k/v, which autograd skips (a few %).
    counted, ours = fc.get_total_flops(), spec.train_flops([37, 37])
    assert counted <= ours < 1.05 * counted


def test_flops_with_supervised_logits_match_torch_flop_counter(tiny_checkpoint, tiny_hf_tokenizer, features):
    """The LM head projects only supervised positions, and the FLOP count says so."""
    from torch.utils.flop_counter import FlopCounterMode

    from mentalglm.models.loading import apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="eager"), LORA)
    spec = FlopSpec.from_model(model)
    assert 0 < spec.head < spec.frozen
    feats = features[:2]
    packed = PackedCollator()(feats)
    n = supervised_positions(packed["labels"])
    assert 0 < n < packed["input_ids"].numel() / 2  # answers are a minority of the tokens
    with FlopCounterMode(display=False) as fc:
        supervised_loss(model, packed, "mask").backward()
    with FlopCounterMode(display=False) as fc_all:
        supervised_loss(model, packed, "all").backward()
    lengths = sample_lengths(packed)
    # Packed rows: the counter sees one square attention over the row, the formula one per sample: compare
    # the difference the head makes, which is free of attention.
    saved = fc_all.get_total_flops() - fc.get_total_flops()
    assert saved == spec.train_flops(lengths) - spec.train_flops(lengths, n)


def _lora_grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("selection", ["mask", "positions", "chunked"])
def test_supervised_logits_loss_and_gradients_equal_labels_loss(
    tiny_checkpoint, tiny_hf_tokenizer, features, selection
):
    from mentalglm.models.loading import apply_lora

    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), LORA)
    for p in model.parameters():  # LoRA B starts at zero: give the gradient of A something to show
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    for feats in (features[::6], grouped_batch(features)):
        for batch in (TrainCollator(tiny_hf_tokenizer.pad_token_id)(feats), PackedCollator()(feats)):
            model.zero_grad()
            want = model(**batch, use_cache=False).loss
            want.backward()
            want_grads = _lora_grads(model)
            model.zero_grad()
            # chunked: 7 supervised positions at a time, so every batch spans several chunks and a partial one
            got = (
                supervised_loss(model, batch, "mask", 7)
                if selection == "chunked"
                else supervised_loss(model, batch, selection)
            )
            got.backward()
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            for k, g in _lora_grads(model).items():
                torch.testing.assert_close(g, want_grads[k], atol=1e-6, rtol=1e-4, msg=k)


def test_logits_selection_follows_what_the_model_understands(tiny_checkpoint):
    from mentalglm.models.loading import apply_lora

    glm = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert logits_selection(glm) == "mask"  # transformers' slice_logits_to_keep: per-row boolean masks
    assert logits_selection(apply_lora(glm, LORA)) == "mask"  # seen through peft

    class NoKeep(torch.nn.Module):  # a model without logits_to_keep: the plain labels= loss
        def forward(self, input_ids, labels=None, use_cache=None): ...

    class PositionsOnly(torch.nn.Module):  # older modeling code: hidden[:, logits_to_keep, :] only
        def forward(self, input_ids, labels=None, use_cache=None, logits_to_keep=0): ...

    assert logits_selection(NoKeep()) == "all"
    assert logits_selection(PositionsOnly()) == "positions"


def test_model_ignoring_logits_to_keep_is_a_clear_error(tiny_model, tiny_hf_tokenizer, features):
    class IgnoresKeep(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, logits_to_keep=0, **inputs):
            return self.model(**inputs)  # full logits whatever was asked

    batch = PackedCollator()(features[:2])
    with pytest.raises(RuntimeError, match="logits for .* positions, expected"):
        supervised_loss(IgnoresKeep(tiny_model), batch, "mask")
    with pytest.raises(ValueError, match="logits selection must be"):
        supervised_loss(tiny_model, batch, "some")


def c_imhi_answers():
    """Every label alone and all labels together, with an explanation after the marker."""
    for task in TASKS.values():
        sets = [[lab] for lab in task.labels]
        if not task.label_sentences:
            sets.append(list(task.labels))
        for labels in sets:
            yield task, labels, task.format_answer(labels, "explanation")


def test_val_stop_strings_never_cut_a_label():
    from mentalglm.config import GenerationConfig

    stops = GenerationConfig().val_stop_strings
    n = 0
    for task, labels, answer in c_imhi_answers():
        cut = cut_at_stop_strings(answer, stops)
        assert cut != answer, (task.name, answer)  # the explanation is dropped ...
        assert parse_labels(task, cut) == parse_labels(task, answer), (task.name, labels)  # ... no label is
        n += 1
    assert n > 50


def test_throughput_monitor_logs_samples_and_real_tokens(tmp_path, tiny_checkpoint, tiny_hf_tokenizer, features):
    """The callback as configured in conf/callbacks/default.yaml, on a short fit with padded batches."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from mentalglm.models.module import MentalGLMModule

    cfg = OmegaConf.load(ROOT / "conf/callbacks/default.yaml").throughput
    cfg.window_size = 2
    monitor = instantiate(cfg)
    batches = [TrainCollator(tiny_hf_tokenizer.pad_token_id)(features[i::6][:4]) for i in range(6)]
    module = MentalGLMModule(
        model={"name": "t", "pretrained": str(tiny_checkpoint), "dtype": "float32"},
        lora=LORA,
        optimizer={"lr": 1e-3},
        generation={},
        tasks=["sos_hl_1k"],
        tokenizer=tiny_hf_tokenizer,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        callbacks=[monitor],
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    last = [r for r in rows if r.get("train/lengths")][-1]
    assert int(float(last["train/lengths"])) == sum(real_tokens(b) for b in batches)  # padding not counted
    assert int(float(last["train/samples"])) == sum(batch_samples(b) for b in batches)
    for key in ("train/device/samples_per_sec", "train/device/items_per_sec", "train/device/flops_per_sec"):
        assert float(last[key]) > 0
    spec = FlopSpec.from_model(module.model)
    assert module.flops_per_batch == spec.train_flops(
        sample_lengths(batches[-1]), supervised_positions(batches[-1]["labels"])
    )


def test_pad_bounded_generation_batches():
    from mentalglm.runtime.generation import plan_batches

    lengths = [1000, 900, 600, 400, 390, 380, 300, 40, 39, 38, 30, 29]  # longest first, as generate sorts
    order = list(range(len(lengths)))
    assert plan_batches(lengths, 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert plan_batches(lengths[::-1], 4, None) == [[11, 10, 9, 8], [7, 6, 5, 4], [3, 2, 1, 0]]  # sorted once, here
    batches = plan_batches(lengths, 4, 0.25)
    assert [i for b in batches for i in b] == order and all(len(b) <= 4 for b in batches)
    for b in batches:
        width = max(lengths[i] for i in b)
        assert all(lengths[i] >= 0.75 * width for i in b)
    assert batches == [[0, 1], [2], [3, 4, 5, 6], [7, 8, 9, 10], [11]]


def test_pad_bounded_generation_keeps_outputs(tiny_model, tiny_hf_tokenizer):
    from mentalglm.data.render import render_prompt
    from mentalglm.runtime.generation import generate

    posts = ["累", "我最近压力很大，每天晚上都睡不着。" * 6, "I feel lonely.", "我很累" * 3, "Work is hard. " * 20]
    prompts = [render_prompt(tiny_hf_tokenizer, p, chat=True) for p in posts]
    one = generate(tiny_model, tiny_hf_tokenizer, prompts, batch_size=1, max_new_tokens=10)
    assert (
        generate(tiny_model, tiny_hf_tokenizer, prompts, batch_size=16, max_new_tokens=10, max_pad_fraction=0.25) == one
    )


@pytest.mark.parametrize(
    "positions, spans",
    [
        ([0, 1, 2, 0, 1, 0], [(0, 3), (3, 5), (5, 6)]),
        ([0, 1, 2, 3], None),  # one sample: plain causal sdpa
        ([0, 1, 3, 0, 1], None),  # not runs of 0..n-1
        ([1, 2, 0, 1], None),  # does not start a sample
    ],
)
def test_packed_spans(positions, spans):
    assert packed_attention.packed_spans(torch.tensor([positions]), len(positions)) == spans


def test_packed_spans_ignore_batches_of_several_rows():
    assert packed_attention.packed_spans(torch.tensor([[0, 1, 0], [0, 1, 0]]), 3) is None
    assert packed_attention.packed_spans(None, 3) is None


def test_sdpa_packed_leaves_padded_batches_and_generation_alone(tiny_checkpoint):
    packed_attention.register()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="sdpa").eval()
    packed = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=packed_attention.NAME).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as in generation
    with torch.no_grad():
        a, b = sdpa(input_ids=ids, attention_mask=mask).logits, packed(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a[mask.bool()], b[mask.bool()])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(sdpa.generate(**kwargs), packed.generate(**kwargs))


def test_chunked_loss_with_a_lora_head_equals_labels_loss(tiny_checkpoint, tiny_hf_tokenizer, features):
    """A head that is not a plain linear layer (LoRA on lm_head) is recomputed per chunk: same loss, same grads."""
    from mentalglm.models.loading import apply_lora

    torch.manual_seed(0)
    model = apply_lora(
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint), {**LORA, "target_modules": ["q_proj", "lm_head"]}
    )
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    batch = TrainCollator(tiny_hf_tokenizer.pad_token_id)(features[::6])
    want = model(**batch, use_cache=False).loss
    want.backward()
    want_grads = _lora_grads(model)
    model.zero_grad()
    got = supervised_loss(model, batch, "mask", 5)
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert any("lm_head" in k for k in want_grads)
    for k, g in _lora_grads(model).items():
        torch.testing.assert_close(g, want_grads[k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.slow
@pytest.mark.real_data
def test_peers_benchmark_runs_trl_beside_the_project(tmp_path):
    """benchmarks/peers.py end to end (LLaMA-Factory left out: it builds a venv of its own)."""
    pytest.importorskip("trl")
    from mentalglm.data.paths import shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("needs ../shared/data")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--per-group", "15", "--steps", "3"]
    cmd += ["--warmup", "1", "--rounds", "1", "--vocab", "0", "--cache-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {c[0]: c for c in (line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| "))}
    rows = {k.strip(): [c.strip() for c in v] for k, v in rows.items()}
    for system in ("plain", "trl", "project-grouped", "project-packed"):
        assert float(rows[system][1].replace(",", "")) > 0 and math.isfinite(float(rows[system][4]))
    assert "llamafactory" not in rows
    assert "goal: project-grouped >= 1.5x trl" in proc.stdout
