"""Training throughput on the real length mix: batching (random padded / length-grouped / packed), logits
(every position / supervised positions only) and the cost of running the step through Lightning instead of a
plain PyTorch + peft loop.

    python benchmarks/train_throughput.py                       # small defaults, a few minutes on 2 CPU cores
    python benchmarks/train_throughput.py --per-group 600 --repeats 5 --tax-steps 60   # 1,800 rows of the real mix

(a) Batching. The same rows (SOS-HL-1K, SocialCD-3K and IMHI DR/dreaddit/SAD train rows from ../shared/data,
loaded, split and rendered by the project's own code, max length 1024) go through one epoch of each batching
mode of `InstructionDataModule.train_dataloader()` at micro-batch 4 with a plain training loop, once with the
loss of `model(..., labels=...)` (logits at every position, what a hand-written loop or a peer does) and once
with the project's loss (`mentalglm.models.loss.supervised_loss`: logits only where a label is). Every run
trains on exactly the same samples, so real tokens/s compares like with like. The reference is random padded
batches with every logit; the framework's training step is grouped (the default) or packed batches with
supervised logits. Runs are interleaved and the median epoch time is reported, because the machine is shared.

(b) Framework tax. The same pre-built batches (the first --tax-steps of a grouped epoch), the same tiny GLM,
LoRA, AdamW + linear schedule, gradient clipping, fp32 and loss: `MentalGLMModule` under a Lightning `Trainer`
vs a hand-written loop; only steps after --warmup are timed, interleaved over --repeats.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import _common as C
import lightning as L
import torch
from _timing import StepTimer
from torch.utils.data import DataLoader

from mentalglm.data.datamodule import InstructionDataModule
from mentalglm.models.loading import apply_lora, load_base_model
from mentalglm.models.loss import logits_selection, supervised_loss
from mentalglm.runtime.throughput import batch_samples, real_tokens

MODES = ("random", "grouped", "packed")
LOGITS = ("all", "supervised")  # labels= (every position) | mentalglm.models.loss (supervised positions only)
LORA = {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
OPTIMIZER = {"lr": 1.0e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_ratio": 0.01}
CLIP = 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--per-group", type=int, default=100, help="rows of SOS-HL-1K, of SocialCD-3K and of IMHI each (default 600)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument(
        "--bucket-batches",
        type=int,
        default=C.data_default("bucket_batches"),
        help="micro-batches per length-sorted bucket (default: mentalglm/config.py DataConfig)",
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every measurement")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--logits", default=",".join(LOGITS), help="all (labels=) and/or supervised (the project's loss)")
    p.add_argument(
        "--vocab",
        type=int,
        default=8000,
        help="BPE vocabulary trained on the benchmark's train rows; "
        "0 = the bundled fixture tokenizer (longer sequences)",
    )
    p.add_argument("--tax-steps", type=int, default=30, help="training steps per framework-tax run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each tax run")
    p.add_argument("--skip-batching", action="store_true")
    p.add_argument("--skip-tax", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=C.default_cache_dir())
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- setup
def build_tokenizer_and_checkpoint(args, records: list[dict]):
    """The tiny 4x256 GLM; its tokenizer is a BPE trained on the rows' text (sequence lengths close to a real
    subword vocabulary) unless --vocab 0. Both are cached in --cache-dir."""
    from transformers import AutoTokenizer

    from mentalglm.models.tiny import default_corpus, ensure_tiny_checkpoint

    if args.vocab:
        corpus = default_corpus() + [r["query"] + "\n" + r["answer"] for r in records]
        path = ensure_tiny_checkpoint(args.cache_dir, corpus=corpus, vocab_size=args.vocab, **C.TINY_4x256)
    else:
        path = ensure_tiny_checkpoint(args.cache_dir, **C.TINY_4x256)
    return AutoTokenizer.from_pretrained(path), path


def load_lora_model(path: Path, seed: int):
    torch.manual_seed(seed)
    cfg = {"name": "tiny_glm", "pretrained": str(path), "dtype": "float32", "attn_implementation": "sdpa"}
    return apply_lora(load_base_model(cfg, ""), LORA)


def train_loader(tokenizer, ds, mode: str, args):
    """The project's own train DataLoader (sampler + collator) for `mode`, over an already tokenized split."""
    data = C.data_config(
        max_length=args.max_length, batch_size=args.batch_size, batching=mode, bucket_batches=args.bucket_batches
    )
    dm = InstructionDataModule(tokenizer, {}, data, chat=True, seed=args.seed)
    dm.datasets["train"] = ds
    return dm.train_dataloader()


def optimizer_and_schedule(model, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=OPTIMIZER["lr"], weight_decay=OPTIMIZER["weight_decay"], betas=tuple(OPTIMIZER["betas"])
    )
    warmup = max(1, round(OPTIMIZER["warmup_ratio"] * total_steps))
    return opt, get_linear_schedule_with_warmup(opt, warmup, total_steps), params


def use_attention_for(model, mode: str) -> None:
    """What training does for `mode` (mentalglm/runtime/builders.py): packed rows get per-sample attention."""
    from mentalglm.models import packed_attention

    packed_attention.register()
    model.get_base_model().set_attn_implementation(packed_attention.attention_for(mode, "sdpa"))


def plain_step(model, batch: dict, opt, sched, params, selection: str) -> float:
    """One optimizer step; `selection` "all" is `model(..., labels=...)`, else the project's loss."""
    loss = supervised_loss(model, batch, selection)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ----------------------------------------------------------------------------- (a) batching
def run_batching(args, tokenizer, path: Path, ds) -> tuple[list[tuple], dict]:
    modes = [m for m in args.modes.split(",") if m]
    logits = [x for x in args.logits.split(",") if x]
    model = load_lora_model(path, args.seed)
    model.train()
    selection = {"all": "all", "supervised": logits_selection(model)}
    runs = [(m, x) for m in modes for x in logits]
    loaders = {m: train_loader(tokenizer, ds, m, args) for m in modes}
    n_batches = len(next(iter(loaders.values())))
    opt, sched, params = optimizer_and_schedule(model, n_batches * len(runs) * (args.repeats + 1))
    stats = {m: {"real": 0, "processed": 0, "samples": 0} for m in modes}
    for m, loader in loaders.items():  # real/processed tokens of a whole epoch (the same every repeat)
        for batch in loader:
            stats[m]["real"] += real_tokens(batch)
            stats[m]["processed"] += batch["input_ids"].numel()
            stats[m]["samples"] += batch_samples(batch)
    step = lambda b, x: plain_step(model, b, opt, sched, params, selection[x])  # noqa: E731
    # Warm-up: allocator, thread pool and sdpa kernels for short and long shapes.
    for m, x in runs:
        use_attention_for(model, m)
        for batch in list(loaders[m])[:3]:
            step(batch, x)
    times = {run: [] for run in runs}
    for r in range(args.repeats):
        for m, x in runs:
            use_attention_for(model, m)
            seconds, _ = C.timed(lambda m=m, x=x: [step(b, x) for b in loaders[m]])
            times[(m, x)].append(seconds)
            print(
                f"  repeat {r + 1}/{args.repeats} {m:8s} {x:10s} {seconds:7.2f} s  (load {os.getloadavg()[0]:.2f})",
                file=sys.stderr,
            )
    rows = []
    ref = runs[0]
    base = stats[ref[0]]["real"] / C.median(times[ref])
    for m, x in runs:
        s, t = stats[m], C.median(times[(m, x)])
        rows.append(
            (
                m,
                x,
                f"{s['real'] / s['processed']:.1%}",
                s["real"] / t,
                s["samples"] / t,
                t,
                f"{(s['real'] / t) / base:.2f}x",
            )
        )
    return rows, {"selection": selection["supervised"], "reference": ref}


def full_split_fractions(args, tokenizer, n_seeds: int = 3) -> list[tuple]:
    """Real-token fraction of random and grouped micro-batches over the WHOLE train split of the mix
    (no model: lengths only), averaged over a few sampler seeds."""
    from mentalglm.data.sampler import LengthGroupedBatchSampler, padding_stats

    records = C.real_split("train", per_group=10**9, seed=args.seed)
    ds, _ = C.tokenize(
        records, tokenizer, with_answer=True, max_length=args.max_length, cache_dir=args.cache_dir / "datasets"
    )
    lengths = ds["length"]
    out = []
    for name, bucket in (("random", 1), ("grouped", args.bucket_batches)):
        fr = [
            padding_stats(
                lengths, list(LengthGroupedBatchSampler(lengths, args.batch_size, bucket_batches=bucket, seed=s))
            )
            for s in range(n_seeds)
        ]
        out.append((name, len(lengths), sum(fr) / len(fr)))
    return out


def ratio_rows(rows: list[tuple]) -> list[tuple]:
    """The issue's target (the framework's step vs random padded with every logit) and what each half gives."""
    speed = {(r[0], r[1]): r[3] for r in rows}
    wanted = [
        (("grouped", "supervised"), ("random", "all"), "training step (default: grouped)", "target >= 1.80"),
        (("packed", "supervised"), ("random", "all"), "training step (packed)", "target >= 1.80"),
        (("grouped", "all"), ("random", "all"), "batching alone: grouped", ""),
        (("packed", "all"), ("random", "all"), "batching alone: packed", ""),
        (("random", "supervised"), ("random", "all"), "supervised logits alone", ""),
    ]
    out = []
    for ours, ref, name, target in wanted:
        if ours in speed and ref in speed:
            out.append(
                (
                    f"real tokens/s, {name}",
                    f"{' + '.join(ref)}: {speed[ref]:,.0f}",
                    f"{' + '.join(ours)}: {speed[ours]:,.0f}",
                    f"{speed[ours] / speed[ref]:.2f}x",
                    target,
                )
            )
    return out


# ----------------------------------------------------------------------------- (b) framework tax
def lightning_run(args, tokenizer, path: Path, batches: list[dict], attn: str = "sdpa") -> tuple[float, list[float]]:
    from mentalglm.models.module import MentalGLMModule

    torch.manual_seed(args.seed)
    module = MentalGLMModule(
        model={"name": "tiny_glm", "pretrained": str(path), "dtype": "float32", "attn_implementation": attn},
        lora=LORA,
        optimizer=OPTIMIZER,
        generation={"max_new_tokens": 8, "val_max_new_tokens": 8},
        tasks=["sos_hl_1k"],
        tokenizer=tokenizer,
    )
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=len(batches),
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=CLIP,
        accumulate_grad_batches=1,
    )
    # batch_size=None: the DataLoader hands over the pre-built batches unchanged, as the plain loop sees them.
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return timer.end - timer.start, timer.losses


def plain_run(args, path: Path, batches: list[dict], selection: str | None = None) -> tuple[float, list[float]]:
    """The hand-written loop; `selection` None is the loss MentalGLMModule.training_step computes, "all" is
    `labels=` (every position)."""
    model = load_lora_model(path, args.seed)
    model.train()
    opt, sched, params = optimizer_and_schedule(model, len(batches))
    selection = selection or logits_selection(model)
    losses, start = [], None
    for i, batch in enumerate(batches):
        if i == args.warmup:
            start = time.perf_counter()
        losses.append(plain_step(model, batch, opt, sched, params, selection))
    return time.perf_counter() - start, losses


def run_tax(args, tokenizer, path: Path, ds) -> list[tuple]:
    batches = list(train_loader(tokenizer, ds, "grouped", args))[: args.tax_steps]
    if len(batches) <= args.warmup:
        sys.exit(f"--tax-steps ({len(batches)} batches available) must exceed --warmup ({args.warmup})")
    timed = batches[args.warmup :]
    samples = sum(batch_samples(b) for b in timed)
    tokens = sum(real_tokens(b) for b in timed)
    times = {"plain": [], "lightning": []}
    losses = {}
    for r in range(args.repeats):
        for name in ("plain", "lightning"):
            run = (
                (lambda: plain_run(args, path, copy.deepcopy(batches)))
                if name == "plain"
                else (lambda: lightning_run(args, tokenizer, path, copy.deepcopy(batches)))
            )
            seconds, losses[name] = run()
            times[name].append(seconds)
            print(
                f"  repeat {r + 1}/{args.repeats} {name:9s} {seconds:7.2f} s  (load {os.getloadavg()[0]:.2f})",
                file=sys.stderr,
            )
    rows = []
    for name in ("plain", "lightning"):
        t = C.median(times[name])
        rows.append((name, samples / t, tokens / t, t, sum(losses[name]) / len(losses[name])))
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = C.real_split("train", args.per_group, seed=args.seed)
    tokenizer, path = build_tokenizer_and_checkpoint(args, C.real_split("train", 10**9, seed=args.seed))
    ds, tok_stats = C.tokenize(
        records, tokenizer, with_answer=True, max_length=args.max_length, cache_dir=args.cache_dir / "datasets"
    )
    lengths = ds["length"]
    print(f"machine: {C.machine()}")
    tok_name = f"BPE {args.vocab} trained on the train rows" if args.vocab else "fixtures BPE"
    print(
        f"data: {len(records)} train rows (SOS-HL-1K/SocialCD-3K/IMHI = 1/1/1), {sum(lengths):,} real tokens, "
        f"mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}; {tok_stats['n_truncated']} truncated to "
        f"{args.max_length}; tokenizer: {tok_name} ({len(tokenizer)} ids); model: tiny GLM "
        f"{C.TINY_4x256['num_layers']} layers x "
        f"{C.TINY_4x256['hidden_size']} hidden, LoRA r{LORA['r']} q/k/v/o, fp32, micro-batch {args.batch_size}"
    )
    if not args.skip_batching:
        print(
            "\n(a) batching: one epoch of the same rows per mode, plain loop, median of "
            f"{args.repeats} interleaved repeats"
        )
        rows, info = run_batching(args, tokenizer, path, ds)
        ref = " + ".join(info["reference"])
        print(
            C.table(
                rows,
                (
                    "batching",
                    "logits",
                    "real-token fraction",
                    "real tokens/s",
                    "samples/s",
                    "epoch s",
                    f"real tokens/s vs {ref}",
                ),
            )
        )
        print(f"supervised logits: logits_to_keep as a {info['selection']!r} selection (mentalglm/models/loss.py)")
        frac = full_split_fractions(args, tokenizer)
        print(
            "\nreal-token fraction over the whole train split (lengths only, mean of 3 sampler seeds): "
            + ", ".join(f"{n} {f:.1%}" for n, _, f in frac)
            + f" ({frac[0][1]:,} rows)"
        )
        print("\n" + C.table(ratio_rows(rows), ("figure", "reference", "ours", "ratio", "target")))
    if not args.skip_tax:
        print(
            f"\n(b) framework tax: {args.tax_steps} grouped batches ({args.warmup} untimed), median of "
            f"{args.repeats} interleaved repeats"
        )
        rows = run_tax(args, tokenizer, path, ds)
        print(C.table(rows, ("loop", "samples/s", "real tokens/s", "timed s", "mean loss")))
        plain, light = rows
        print(
            "\n"
            + C.table(
                [
                    (
                        "real tokens/s",
                        f"{plain[2]:,.0f} (plain PyTorch + peft)",
                        f"{light[2]:,.0f} (MentalGLMModule + Trainer)",
                        f"{light[2] / plain[2]:.3f}x",
                        "target >= 0.95x",
                    )
                ],
                ("figure", "reference", "ours", "ratio", "target"),
            )
        )


if __name__ == "__main__":
    main()
