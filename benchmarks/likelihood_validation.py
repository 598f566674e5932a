"""Validation without generation: label likelihoods (`validation.mode=likelihood`) vs label-only generation.

    python benchmarks/likelihood_validation.py                  # 300 items, about a minute once the adapter exists
    python benchmarks/likelihood_validation.py --per-group 300  # ~900 items

The same validation items, model and batches as benchmarks/generation.py (real SOS-HL-1K, SocialCD-3K and IMHI
DR/dreaddit/SAD rows from ../shared/data; the tiny GLM with the LoRA adapter that script trains and caches):

  generate    the in-loop default: `MentalGLMModule.generate_texts(prompts, full=False)` on the val batches
  likelihood  `validation.mode=likelihood`: one pass over each batch's prompts, then every candidate label
              sentence scored against the prompts' KV cache (`MentalGLMModule._likelihood_rows`)

Both are timed in the same process, interleaved over --repeats rounds (median). Printed: seconds, items/s, the
speed-up, F1 of each against the gold labels (the one scoring path) and the agreement: the share of items whose
most likely labels equal the labels parsed from the generated label sentence.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import _common as C
import generation as G

from mentalglm.scoring.metrics import mean_f1
from mentalglm.scoring.score import score
from mentalglm.tasks import get_task


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-group", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", type=Path, default=None, help="a trained adapter instead of generation.py's")
    p.add_argument("--cache-dir", type=Path, default=C.default_cache_dir())
    # generation.py's model settings (its adapter is found in the cache by them)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--vocab", type=int, default=8000)
    return p.parse_args(argv)


def generate_rows(module, loader) -> list[dict]:
    rows = []
    for batch in loader:
        rows += module._rows(batch, module.generate_texts(batch["prompts"], full=False))
    return rows


def likelihood_rows(module, loader) -> list[dict]:
    rows = []
    for batch in loader:
        rows += module._likelihood_rows(batch)
    return rows


def prompt_pass_only(module, loader) -> list[dict]:
    """The floor both ways pay: one forward over each batch's prompts (generation's prefill)."""
    from mentalglm.runtime.likelihood import SharedPrompts, _pad_id

    for batch in loader:
        SharedPrompts(module.model, batch["prompts"], _pad_id(module.tokenizer))
    return []


def main(argv=None) -> None:
    args = parse_args(argv)
    gen, batch_size, tokenizer, model, where, records, dm = G.setup(args)
    names = sorted({r["task"] for r in records})
    module = G.build_module(model, tokenizer, gen, names)
    module.model_cfg.chat = True  # the benchmark's prompts and answers go through the chat template
    tasks = {n: get_task(n) for n in names}
    print(f"machine: {C.machine()}")
    print(f"model: tiny GLM 4x256 + LoRA {where}; {len(records)} validation items; eval batch {batch_size}")
    ways = {"generate": generate_rows, "likelihood": likelihood_rows, "prompt pass only": prompt_pass_only}
    warm = list(dm.val_dataloader())[:1]
    for fn in ways.values():
        fn(module, warm)
    times: dict[str, list[float]] = {name: [] for name in ways}
    outputs: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        for name, fn in ways.items():
            seconds, outputs[name] = C.timed(lambda fn=fn: fn(module, dm.val_dataloader()))
            times[name].append(seconds)
            print(
                f"  repeat {r + 1}/{args.repeats} {name:10s} {seconds:7.2f} s  (load {os.getloadavg()[0]:.2f})",
                file=sys.stderr,
            )
    floor = C.median(times.pop("prompt pass only"))
    outputs.pop("prompt pass only")
    scored = {name: score(rows, tasks) for name, rows in outputs.items()}
    by_item = {(r["task"], r["id"]): r for r in scored["generate"][0]}
    likely = scored["likelihood"][0]
    rows = []
    for name in times:
        t = C.median(times[name])
        rows.append((name, t, len(records) / t, f"{mean_f1(scored[name][1]):.3f}"))
    print(C.table(rows, ("way", "seconds", "items/s", "F1 mean vs gold")))
    agreed = [sorted(r["likelihood_labels"]) == sorted(by_item[(r["task"], r["id"])]["pred_labels"]) for r in likely]
    agree = sum(agreed)
    speedup = C.median(times["generate"]) / C.median(times["likelihood"])
    per_task = ", ".join(
        f"{n} {sum(a for a, r in zip(agreed, likely) if r['task'] == n)}/{sum(r['task'] == n for r in likely)}"
        for n in names
    )
    print(
        C.table(
            [
                ("speed-up, likelihood vs label-only generation", f"{speedup:.1f}x", "target >= 3x"),
                (
                    "beyond the prompt pass both pay",
                    f"{(C.median(times['generate']) - floor) / max(1e-9, C.median(times['likelihood']) - floor):.1f}x",
                    f"prompt pass alone: {floor:.2f} s",
                ),
                ("agreement with the generated labels", f"{agree}/{len(likely)} ({agree / len(likely):.1%})", per_task),
            ],
            ("figure", "value", "note"),
        )
    )


if __name__ == "__main__":
    main()
