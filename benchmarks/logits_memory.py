"""Logits memory at GLM-4's vocabulary: the supervised-positions loss vs the chunked LM head + cross-entropy.

    python benchmarks/logits_memory.py                       # about 5 minutes
    python benchmarks/logits_memory.py --layers 4 --batch 2

(a) The LM head and the loss alone, at GLM-4-9b's width and vocabulary (hidden 4096, 151,552 ids, fp32): the
hidden states of the supervised positions of a 4 x 1024 micro-batch whose answers are a third of the tokens
(1,365 positions, as on the paper's data mix) through the head and cross-entropy, forward and backward:
`supervised` (the default: all supervised positions' logits at once) vs `chunked` (`model.loss_chunk_size`).

(b) One whole training step of a GLM with that width and vocabulary and a few decoder layers (32 heads, 2 KV
heads, MLP 13,696, random weights, LoRA r8 q/k/v/o) on --batch x --length tokens: `all` (`labels=`, logits at
every position), `supervised` and `chunked`.

Every measurement runs in a fresh process: peak memory is the process's peak RSS during the steps (reset after
setup) minus its RSS before them; step time is the median of --steps steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PATHS = ("all", "supervised", "chunked")
HEAD_PATHS = ("head-supervised", "head-chunked")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256, help="model.loss_chunk_size of the chunked path")
    p.add_argument("--head-positions", type=int, default=4 * (1024 - 2 * 1024 // 3), help="(a): supervised positions")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--path", choices=PATHS + HEAD_PATHS, help=argparse.SUPPRESS)  # one measurement, in a child
    return p.parse_args(argv)


def reset_peak() -> None:
    """Set the process's peak RSS (VmHWM) to its current RSS, so what setup allocated and freed is not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_head(args) -> dict:
    import torch
    import torch.nn.functional as F

    from mentalglm.models.loss import ChunkedLinearCrossEntropy

    torch.manual_seed(0)
    weight = torch.randn(151552, 4096) * 0.02  # the frozen LM head
    targets = torch.randint(0, 151552, (args.head_positions,))
    hiddens = [torch.randn(args.head_positions, 4096, requires_grad=True) for _ in range(args.steps + 1)]
    before = rss_bytes()
    reset_peak()
    times = []
    for i, hidden in enumerate(hiddens):
        t0 = time.perf_counter()
        if args.path == "head-chunked":
            loss = ChunkedLinearCrossEntropy.apply(hidden, weight, None, targets, args.chunk)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        loss.backward()
        if i:
            times.append(time.perf_counter() - t0)
    return {"path": args.path, "peak_gb": (peak_bytes() - before) / 2**30, "step_s": statistics.median(times)}


def measure(args) -> dict:
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    from mentalglm.data.render import IGNORE_INDEX
    from mentalglm.models.loading import apply_lora
    from mentalglm.models.loss import supervised_loss

    torch.manual_seed(0)
    config = GlmConfig(
        vocab_size=151552,
        hidden_size=4096,
        intermediate_size=13696,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=args.length,
    )
    model = apply_lora(
        GlmForCausalLM(config),
        {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    )
    model.train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.length))
    labels = ids.clone()
    labels[:, : 2 * args.length // 3] = IGNORE_INDEX  # the prompt: two thirds of the tokens
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def step():
        if args.path == "all":
            loss = model(**batch, use_cache=False).loss
        else:
            loss = supervised_loss(model, batch, "mask", args.chunk if args.path == "chunked" else None)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    before = rss_bytes()
    reset_peak()
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - t0)
    return {"path": args.path, "peak_gb": (peak_bytes() - before) / 2**30, "step_s": statistics.median(times)}


def run_child(argv, path: str) -> dict:
    cmd = [sys.executable, __file__, *argv, "--path", path]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    result = json.loads(out)
    print(f"  {path:16s} peak {result['peak_gb']:.2f} GB, step {result['step_s']:.2f} s", file=sys.stderr)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.path:
        print(json.dumps(measure_head(args) if args.path.startswith("head") else measure(args)))
        return
    import _common as C

    argv = list(argv or sys.argv[1:])
    head = {p: run_child(argv, p) for p in HEAD_PATHS}
    step = {p: run_child(argv, p) for p in PATHS}
    print(f"machine: {C.machine()}")
    print(
        f"(a) LM head + cross-entropy: hidden 4096, vocab 151,552, fp32, {args.head_positions} supervised positions, "
        f"chunk {args.chunk}"
    )
    print(
        C.table(
            [(p.removeprefix("head-"), f"{r['peak_gb']:.2f}", f"{r['step_s']:.2f}") for p, r in head.items()],
            ("path", "peak GB", "forward + backward s"),
        )
    )
    supervised_positions = args.batch * (args.length - 2 * args.length // 3)
    print(
        f"(b) training step: GLM hidden 4096, vocab 151,552, {args.layers} decoder layers, fp32, LoRA r8 q/k/v/o; "
        f"batch {args.batch} x {args.length} tokens, {supervised_positions} supervised; chunk {args.chunk}"
    )
    print(
        C.table(
            [(p, f"{r['peak_gb']:.2f}", f"{r['step_s']:.1f}") for p, r in step.items()],
            ("path", "peak GB (step)", "step s"),
        )
    )
    hs, hc = head["head-supervised"], head["head-chunked"]
    sup, chk = step["supervised"], step["chunked"]
    print(
        C.table(
            [
                ("(a) peak logits memory, chunked vs supervised", f"{hc['peak_gb'] / hs['peak_gb']:.2f}x", "<= 0.25x"),
                ("(a) head + loss time, chunked vs supervised", f"{hc['step_s'] / hs['step_s']:.2f}x", ""),
                ("(b) step peak memory, chunked vs supervised", f"{chk['peak_gb'] / sup['peak_gb']:.2f}x", ""),
                ("(b) step time, chunked vs supervised", f"{chk['step_s'] / sup['step_s']:.2f}x", "<= 1.10x"),
            ],
            ("figure", "ratio", "target"),
        )
    )


if __name__ == "__main__":
    main()
