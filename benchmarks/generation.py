"""Generation-based validation speed: what the training loop does vs the slow ways peers do it.

    python benchmarks/generation.py                   # 300 items, a few minutes on 2 quiet CPU cores
    python benchmarks/generation.py --per-group 300   # ~900 items, about a stage-two validation set

Three ways to get the labels of the same validation items (real SOS-HL-1K, SocialCD-3K and IMHI
DR/dreaddit/SAD validation rows from ../shared/data, kept in split order):

  ours        the in-loop path: `MentalGLMModule.generate_texts(prompts, full=False)` on the batches of
              `InstructionDataModule.val_dataloader()` (length-sorted, left-padded, batch data.eval_batch_size
              split where padding would pass generation.val_max_pad_fraction, greedy + KV cache, stops at
              the label sentence: generation.val_stop_strings or the end token, at most val_max_new_tokens)
  per-sample  batch 1, full answers (generation.max_new_tokens, no stop strings): peers' loop
  data-order  the same label-only generation as ours, batch --reference-batch (16), in data order

Every item's parsed labels must be identical across the three (the script exits non-zero otherwise).

Honesty: a random model never writes a label sentence, a stop string or the end token, so every way would
run to its token cap and "stopping at the label sentence" would be measured on fiction. The model here is
the tiny GLM (4 layers x 256 hidden, the BPE of benchmarks/train_throughput.py) with a LoRA adapter trained
briefly (--train-steps) on the real train rows of the same tasks: it writes the label sentence, then for IMHI
"Reasoning: ..." and an explanation, then the end token, like a fine-tuned GLM-4. The table reports how
many tokens each way generated per item next to the gold answers' length, and how often ours stopped
before its cap. --adapter uses an adapter you trained instead (e.g. the demo's best_adapter).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import _common as C
import torch

from mentalglm.data.datamodule import InstructionDataModule
from mentalglm.runtime.generation import generate
from mentalglm.scoring.parsing import parse_labels
from mentalglm.tasks import get_task

TRAIN_LORA = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--per-group", type=int, default=100, help="validation items of SOS-HL-1K, of SocialCD-3K and of IMHI each"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="repetitions of the fast ways (median), with per-sample generation run in as many slices",
    )
    # 300 steps leave a model that loops ("related to the stress cause related to ...") past the label cap on
    # some IMHI items; after 1,000 its answers are gold-length (41.7 vs 44 tokens per item) and end.
    p.add_argument("--train-steps", type=int, default=1000, help="steps of the brief LoRA training (cached)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument(
        "--train-max-length",
        type=int,
        default=256,
        help="training rows are cut to this (the post is truncated; label sentence and answer kept)",
    )
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--vocab", type=int, default=8000, help="as in train_throughput.py; 0 = fixture tokenizer")
    p.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="a trained LoRA adapter directory (its base model is read from adapter_config.json)",
    )
    p.add_argument("--skip-per-sample", action="store_true", help="skip the slow per-sample full-answer way")
    p.add_argument("--reference-batch", type=int, default=16, help="batch size of the data-order way")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=C.default_cache_dir())
    return p.parse_args(argv)


def generation_cfg() -> dict:
    from mentalglm.config import GenerationConfig, to_dict

    return to_dict(GenerationConfig())


# ----------------------------------------------------------------------------- model
def base_and_tokenizer(args):
    from transformers import AutoTokenizer

    if args.adapter is not None:
        base = json.loads((args.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        return Path(base), AutoTokenizer.from_pretrained(base)
    import train_throughput as T

    tokenizer, path = T.build_tokenizer_and_checkpoint(args, C.real_split("train", 10**9, seed=args.seed))
    return path, tokenizer


def trained_model(args, base: Path, tokenizer):
    """The base with `--adapter`, or with a LoRA adapter trained here (saved in the cache, reused next time)."""
    from peft import PeftModel

    from mentalglm.models.loading import apply_lora, load_base_model

    model_cfg = {"name": "tiny_glm", "pretrained": str(base), "dtype": "float32", "attn_implementation": "sdpa"}
    if args.adapter is not None:
        return PeftModel.from_pretrained(load_base_model(model_cfg, ""), str(args.adapter)).eval(), str(args.adapter)
    settings = [str(base), args.train_steps, args.train_batch, args.train_max_length, args.lr, args.seed, TRAIN_LORA]
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = args.cache_dir / f"bench-generation-adapter-{key}"
    if (path / "adapter_model.safetensors").is_file():
        return PeftModel.from_pretrained(load_base_model(model_cfg, ""), str(path)).eval(), f"{path} (cached)"
    torch.manual_seed(args.seed)
    model = apply_lora(load_base_model(model_cfg, ""), TRAIN_LORA)
    seconds, loss = C.timed(lambda: train_briefly(args, model, tokenizer))
    print(
        f"trained LoRA for {args.train_steps} steps in {seconds:.0f} s (last-20 mean loss {loss:.2f})", file=sys.stderr
    )
    model.save_pretrained(str(path))
    return model.eval(), f"{path} (trained now)"


def train_briefly(args, model, tokenizer) -> float:
    records = C.real_split("train", 2000, seed=args.seed)
    ds, _ = C.tokenize(
        records, tokenizer, with_answer=True, max_length=args.train_max_length, cache_dir=args.cache_dir / "datasets"
    )
    dm = InstructionDataModule(tokenizer, {}, C.data_config(batch_size=args.train_batch), chat=True, seed=args.seed)
    dm.datasets["train"] = ds
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    # 20 warm-up steps, then linear decay to 5%.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / args.train_steps)
    )
    model.train()
    losses, step, epoch = [], 0, 0
    while step < args.train_steps:
        dm.sampler = None
        loader = dm.train_dataloader()
        dm.sampler.set_epoch(epoch)
        for batch in loader:
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            step += 1
            if step >= args.train_steps:
                break
        epoch += 1
    return sum(losses[-20:]) / len(losses[-20:])


# ----------------------------------------------------------------------------- counting decode work
class ForwardCounter:
    """Counts forward passes and the token positions they computed (padding and finished rows included)."""

    def __init__(self, model):
        self.calls = self.positions = 0
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.handle = inner.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None:
            self.calls += 1
            self.positions += ids.numel()

    def reset(self) -> tuple[int, int]:
        out = (self.calls, self.positions)
        self.calls = self.positions = 0
        return out


# ----------------------------------------------------------------------------- the three ways
def ours(module, loader) -> list[str]:
    """The validation loop's own code: `generate_texts(full=False)` on the val DataLoader's batches."""
    texts: dict[int, str] = {}
    for batch in loader:
        for i, text in zip(batch["index"], module.generate_texts(batch["prompts"], full=False)):
            texts[int(i)] = text
    return [texts[i] for i in sorted(texts)]


def per_sample_full(model, tokenizer, prompts, gen: dict) -> list[str]:
    return generate(
        model,
        tokenizer,
        prompts,
        batch_size=1,
        max_new_tokens=int(gen["max_new_tokens"]),
        stop_strings=(),
        sort_by_length=False,
    )


def data_order(model, tokenizer, prompts, gen: dict, batch_size: int) -> list[str]:
    return generate(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=int(gen["val_max_new_tokens"]),
        stop_strings=list(gen["val_stop_strings"]),
        sort_by_length=False,
    )


def build_module(model, tokenizer, gen: dict, tasks: list[str]):
    from mentalglm.models.module import MentalGLMModule

    module = MentalGLMModule(
        model={"name": "tiny_glm"}, lora=None, optimizer={}, generation=gen, tasks=tasks, tokenizer=tokenizer
    )
    module.model = model
    return module


def val_items(args, tokenizer, batch_size: int):
    """Sampled validation items in split order (tasks one after another, as the val split holds them)."""
    from mentalglm.data.splits import build_splits

    val = build_splits(C.shared_specs(C.require_shared_data()), seed=42)["val"]
    picked = {id(r) for r in C.sample_mix(val, args.per_group, args.seed)}
    records = [r for r in val if id(r) in picked]
    dm = InstructionDataModule(
        tokenizer,
        {},
        C.data_config(eval_batch_size=batch_size),
        chat=True,
        seed=args.seed,
        val_max_pad_fraction=generation_cfg()["val_max_pad_fraction"],
    )
    dm.datasets["val"], stats = C.tokenize(records, tokenizer, with_answer=False, cache_dir=args.cache_dir / "datasets")
    if stats["n_too_long"]:
        sys.exit(f"{stats['n_too_long']} validation items do not fit max_length 1024")
    return records, dm


def parsed(records: list[dict], texts: list[str]) -> list[list[str]]:
    return [parse_labels(get_task(r["task"]), t).labels for r, t in zip(records, texts)]


def new_tokens(tokenizer, texts: list[str]) -> float:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / max(1, len(texts))


def setup(args):
    """What the validation benchmarks (this one, likelihood_validation.py) start from: the generation config, the
    eval batch size, the tokenizer, the trained model (and where it came from), the items and their datamodule."""
    warnings.filterwarnings("ignore")
    logging.getLogger("mentalglm").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = generation_cfg()
    batch_size = int(C.data_default("eval_batch_size"))
    base, tokenizer = base_and_tokenizer(args)
    model, where = trained_model(args, base, tokenizer)
    records, dm = val_items(args, tokenizer, batch_size)
    return gen, batch_size, tokenizer, model, where, records, dm


def main(argv=None) -> None:
    args = parse_args(argv)
    gen, batch_size, tokenizer, model, where, records, dm = setup(args)
    ds = dm.datasets["val"]
    prompts = [list(x) for x in ds["input_ids"]]
    module = build_module(model, tokenizer, gen, sorted({r["task"] for r in records}))
    mix = ", ".join(f"{t} {sum(r['task'] == t for r in records)}" for t in C.MIX)
    gold_tokens = new_tokens(tokenizer, [r["answer"] for r in records])
    print(f"machine: {C.machine()}")
    print(
        f"model: tiny GLM 4x256 + LoRA {where}; {len(records)} validation items "
        f"({mix}), prompt tokens mean "
        f"{sum(map(len, prompts)) / len(prompts):.0f}, max {max(map(len, prompts))}; gold answers "
        f"{gold_tokens:.0f} tokens on average; generation config: {gen}; eval batch {batch_size} (data-order: "
        f"{args.reference_batch})"
    )

    counter = ForwardCounter(model)
    ours(module, list(dm.val_dataloader())[:1])  # warm-up
    counter.reset()
    fast = {
        "ours": lambda: ours(module, dm.val_dataloader()),
        "data-order": lambda: data_order(model, tokenizer, prompts, gen, args.reference_batch),
    }
    times: dict[str, list[float]] = {name: [] for name in fast}
    outputs, work = {}, {}
    # The machine is shared: per-sample generation (by far the slowest) runs in --repeats slices between
    # the repeats of the fast ways, so all three see the same mix of quiet and busy moments.
    per_sample = [""] * len(prompts)
    if not args.skip_per_sample:
        times["per-sample"], work["per-sample"] = [], (0, 0)
    for r in range(args.repeats):
        for name, fn in fast.items():
            seconds, outputs[name] = C.timed(fn)
            times[name].append(seconds)
            work[name] = counter.reset()
            print(
                f"  repeat {r + 1}/{args.repeats} {name:10s} {seconds:7.2f} s  (load {os.getloadavg()[0]:.2f})",
                file=sys.stderr,
            )
        if args.skip_per_sample:
            continue
        rows = list(range(r, len(prompts), args.repeats))
        part = [prompts[i] for i in rows]
        seconds, texts = C.timed(lambda part=part: per_sample_full(model, tokenizer, part, gen))
        for i, text in zip(rows, texts):
            per_sample[i] = text
        times["per-sample"].append(seconds)
        work["per-sample"] = tuple(a + b for a, b in zip(work["per-sample"], counter.reset()))
        print(
            f"  slice  {r + 1}/{args.repeats} per-sample {seconds:7.2f} s  (load {os.getloadavg()[0]:.2f})",
            file=sys.stderr,
        )
    if not args.skip_per_sample:
        outputs["per-sample"] = per_sample
        times["per-sample"] = [sum(times["per-sample"])]  # the slices add up to one pass over all items

    labels = {name: parsed(records, texts) for name, texts in outputs.items()}
    mismatches = {
        name: [i for i, (a, b) in enumerate(zip(labels["ours"], labs)) if a != b]
        for name, labs in labels.items()
        if name != "ours"
    }
    cap = int(gen["val_max_new_tokens"])
    stopped = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) < cap for t in outputs["ours"])
    rows = []
    for name in times:
        t = C.median(times[name])
        calls, positions = work[name]
        rows.append(
            (
                name,
                t,
                len(records) / t,
                new_tokens(tokenizer, outputs[name]),
                f"{calls:,}",
                f"{positions:,}",
                f"{sum(bool(x) for x in labels[name]) / len(records):.0%}",
            )
        )
    print(
        C.table(
            rows, ("way", "seconds", "items/s", "new tokens/item", "forward passes", "positions computed", "parsed")
        )
    )
    print(
        f"ours stopped before its {cap}-token cap on {stopped}/{len(records)} items; "
        f"parsed labels identical to ours: "
        + ", ".join(f"{n} {len(records) - len(m)}/{len(records)}" for n, m in mismatches.items())
    )
    t_ours, t_order = C.median(times["ours"]), C.median(times["data-order"])
    summary = [
        (
            f"vs data-order batch {args.reference_batch} (same stops)",
            f"{t_order:.2f} s",
            f"{t_ours:.2f} s",
            f"{t_order / t_ours:.1f}x",
            "target >= 1.5x",
        )
    ]
    if "per-sample" in times:
        summary.insert(
            0,
            (
                "vs per-sample full answers",
                f"{times['per-sample'][0]:.2f} s",
                f"{t_ours:.2f} s",
                f"{times['per-sample'][0] / t_ours:.1f}x",
                "target >= 10x",
            ),
        )
    print("\n" + C.table(summary, ("ours (batched, sorted, label-only)", "reference", "ours", "speed-up", "target")))
    bad = {n: m for n, m in mismatches.items() if m}
    if bad:
        for n, m in bad.items():
            print(f"parsed labels differ from ours on {len(m)} items with {n}: indices {m[:20]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
