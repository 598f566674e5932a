"""Memory of a bf16 base vs an 8-bit and a 4-bit (QLoRA) base, loaded and trained through the project's path.

    python benchmarks/qlora_memory.py                 # 2 decoder layers, 16 tokens: about 15 minutes on 2 CPU cores
    python benchmarks/qlora_memory.py --layers 4 --length 64

A random-weight model of GLM-4-9b's width and vocabulary (hidden 4096, 32 heads, 2 KV heads, MLP 13,696,
151,552 ids) with --layers decoder layers is written once as a bf16 checkpoint. Each variant then runs in a
fresh process: `load_base_model` (bitsandbytes for 8bit/4bit, compute dtype bf16), `apply_lora` (r8 q/k/v/o)
and --steps training steps on --batch x --length tokens. Reported per variant: the bytes of the model's
parameters and buffers, the process's resident memory after loading (minus before), and its peak during the
training steps (minus before loading). `peft-4bit` / `peft-8bit` load the same way but prepare the model with
peft's `prepare_model_for_kbit_training`, which casts every parameter that is not quantized (embeddings, LM
head, norms, biases) to fp32: what the project did before, and what most QLoRA scripts still do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = ("bf16", "8bit", "4bit", "peft-8bit", "peft-4bit")


def parse_args(argv=None):
    import _common as C

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=16, help="tokens per sample (bf16 matmuls are slow on CPUs)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cache-dir", type=Path, default=C.default_cache_dir())
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in a child
    return p.parse_args(argv)


def checkpoint(cache_dir: Path, layers: int) -> Path:
    """The GLM-4-shaped bf16 checkpoint with `layers` decoder layers, written once (renamed into place)."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    path = cache_dir / f"glm4-shape-{layers}layers-bf16"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = GlmConfig(num_hidden_layers=layers, vocab_size=151552, hidden_size=4096, intermediate_size=13696)
    model = GlmForCausalLM._from_config(config, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(path)
    return path


def measure(args) -> dict:
    import torch
    from logits_memory import peak_bytes, reset_peak, rss_bytes

    from mentalglm.data.render import IGNORE_INDEX
    from mentalglm.models.loading import apply_lora, load_base_model, quantization_config

    path = checkpoint(args.cache_dir, args.layers)
    kind = args.variant.removeprefix("peft-")
    before = rss_bytes()
    reset_peak()
    if args.variant.startswith("peft-"):
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        quant = quantization_config(kind, torch.bfloat16)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quant)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        model_cfg = {
            "name": "glm4-shape",
            "pretrained": str(path),
            "dtype": "bfloat16",
            "attn_implementation": "sdpa",
            "quantization": None if kind == "bf16" else kind,
        }
        base = load_base_model(model_cfg, args.cache_dir)
    torch.manual_seed(0)
    model = apply_lora(
        base, {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    )
    tensors = [*model.parameters(), *model.buffers()]
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    fp32_frozen = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32 and not p.requires_grad)
    # safetensors are memory-mapped: touch every page, so weights a short step never reads count as resident
    # (on a GPU every weight is).
    for t in tensors:
        t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()
    loaded = rss_bytes() - before
    ids = torch.randint(
        0, base.config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0)
    )
    labels = ids.clone()
    labels[:, : 2 * args.length // 3] = IGNORE_INDEX
    model.train()
    losses = []
    for _ in range(args.steps):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {
        "variant": args.variant,
        "model_gb": model_bytes / 2**30,
        "loaded_gb": loaded / 2**30,
        "peak_gb": (peak_bytes() - before) / 2**30,
        "fp32_frozen": fp32_frozen,
        "loss": losses[-1],
    }


def run_child(argv, variant: str) -> dict:
    cmd = [sys.executable, __file__, *argv, "--variant", variant]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"  {variant:10s} model {r['model_gb']:.2f} GB, peak {r['peak_gb']:.2f} GB, loss {r['loss']:.3f}",
        file=sys.stderr,
    )
    return r


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args)))
        return
    import _common as C

    argv = list(argv if argv is not None else sys.argv[1:])
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
    checkpoint(args.cache_dir, args.layers)  # once, before the children race for it
    results = {v: run_child(argv, v) for v in variants}
    print(f"machine: {C.machine()}")
    print(
        f"GLM hidden 4096, vocab 151,552, {args.layers} decoder layers (MLP 13,696, 32 heads, 2 KV heads), random "
        f"weights, LoRA r8 q/k/v/o; {args.steps} training step(s) on {args.batch} x {args.length} tokens"
    )
    ref = results.get("bf16")
    rows = []

    def ratio(r: dict, key: str) -> str:
        return f"{r[key] / ref[key]:.2f}x" if ref else "-"

    for v, r in results.items():
        rows.append(
            (
                v,
                f"{r['model_gb']:.2f}",
                ratio(r, "model_gb"),
                f"{r['loaded_gb']:.2f}",
                f"{r['peak_gb']:.2f}",
                ratio(r, "peak_gb"),
                f"{r['fp32_frozen'] / 1e6:,.0f}M",
            )
        )
    header = ("base", "model GB", "vs bf16", "resident after load GB", "peak GB", "peak vs bf16", "frozen fp32 params")
    print(C.table(rows, header))


if __name__ == "__main__":
    main()
