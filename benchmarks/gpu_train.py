"""GLM-4-9b-shaped LoRA training and validation generation on one GPU: tokens/s, MFU, peak memory.

    python benchmarks/gpu_train.py                                            # bf16-mixed LoRA r8 q/k/v/o
    python benchmarks/gpu_train.py --quantization 4bit --gradient-checkpointing   # QLoRA (a 24 GB card?)
    python benchmarks/gpu_train.py --tiny                                     # the same code, tiny GLM, CPU

The model is `GlmConfig()` (GLM-4-9b's shape: 40 layers, hidden 4096, 32 heads, 2 KV heads, vocabulary
151,552) with random weights, so nothing is downloaded. It is written once as a safetensors checkpoint in
--cache-dir (about 19 GB; `--tiny` uses the 4 x 256 tiny GLM) and then loaded the way train.py loads
`THUDM/glm-4-9b-hf`: `load_base_model` (bitsandbytes for --quantization), `apply_lora`, `MentalGLMModule`
under a Lightning Trainer, micro-batch 4 of full 1,024-token rows whose last 34% carry labels (the answer
share of the paper's mix), AdamW. Random weights and random tokens cost exactly what real ones do.

Training: steps after --warmup are timed; MFU = model FLOPs (`mentalglm.runtime.throughput.FlopSpec`, the figure
ThroughputMonitor logs: recomputation under gradient checkpointing is not counted) / time / the GPU's peak
(Lightning's table, or --peak-tflops). Peak memory: `torch.cuda.max_memory_allocated` over the run.
Generation: the trained model, greedy with the KV cache, --gen-batch prompts of --gen-prompt tokens,
exactly --gen-new new tokens each (`min_new_tokens`, as a random model rarely stops): new tokens/s.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import _common as C
import lightning as L
import torch
from torch.utils.data import DataLoader
from train_throughput import StepTimer

from mentalglm.models.loss import supervised_positions
from mentalglm.runtime.throughput import FlopSpec

LORA = {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
OPTIMIZER = {"lr": 1.0e-4, "weight_decay": 0.0, "warmup_ratio": 0.01}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny 4 x 256 GLM (a CPU smoke test of this script)")
    p.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision (the paper's V100: 16-mixed)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--answer-fraction",
        type=float,
        default=0.34,
        help="supervised (answer) share of each row's tokens (the real mix: 34%%); the loss "
        "projects only those positions onto the vocabulary",
    )
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gen-batch", type=int, default=int(C.data_default("eval_batch_size")))
    p.add_argument("--gen-prompt", type=int, default=256, help="prompt tokens per item")
    p.add_argument("--gen-new", type=int, default=32, help="new tokens per item (label-only validation: ~8-48)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if Lightning lacks it"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=C.default_cache_dir())
    return p.parse_args(argv)


def accelerator() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def glm4_9b_checkpoint(cache_dir: Path, dtype: torch.dtype) -> Path:
    """A random-weight GLM-4-9b-shaped checkpoint (written once, built on the GPU when there is one)."""
    from transformers import GlmConfig, GlmForCausalLM

    path = cache_dir / "glm4-9b-shape-random"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = GlmForCausalLM._from_config(GlmConfig(), dtype=dtype)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(path)  # a half-written checkpoint is never taken for a finished one
    del model
    torch.cuda.empty_cache()
    return path


def checkpoint_and_tokenizer(args) -> tuple[Path, object]:
    """The model to load, and a tokenizer for the module's pad id (the tiny GLM's; its ids fit any GLM vocab)."""
    from transformers import AutoTokenizer

    tiny = C.tiny_checkpoint(args.cache_dir, C.TINY_4x256)
    path = tiny if args.tiny else glm4_9b_checkpoint(args.cache_dir, torch.bfloat16)
    return path, AutoTokenizer.from_pretrained(tiny)


def random_batches(n: int, vocab: int, args) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        labels = ids.clone()
        labels[:, : args.seq - max(1, round(args.answer_fraction * args.seq))] = -100  # the prompt: no loss
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def train(args, path: Path, tokenizer):
    from mentalglm.models.module import MentalGLMModule

    model_cfg = {
        "name": "bench",
        "pretrained": str(path),
        "dtype": "bfloat16" if not args.tiny else "float32",
        "attn_implementation": args.attn,
        "gradient_checkpointing": args.gradient_checkpointing,
        "quantization": None if args.quantization == "none" else args.quantization,
    }
    torch.manual_seed(args.seed)
    module = MentalGLMModule(
        model=model_cfg, lora=LORA, optimizer=OPTIMIZER, generation={}, tasks=["sos_hl_1k"], tokenizer=tokenizer
    )
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=accelerator(),
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=1.0,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    module.configure_model()
    vocab = module.model.config.vocab_size
    batches = random_batches(args.steps, vocab, args)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    seconds = timer.end - timer.start
    steps = args.steps - args.warmup
    spec = FlopSpec.from_model(module.model)
    flops = spec.train_flops([args.seq] * args.batch, supervised_positions(batches[0]["labels"])) * steps
    return module, seconds, steps, flops


def generation(args, model) -> tuple[float, int]:
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (args.gen_batch, args.gen_prompt), generator=g).to(device)
    config = GenerationConfig(
        max_new_tokens=args.gen_new, min_new_tokens=args.gen_new, do_sample=False, use_cache=True, pad_token_id=0
    )
    model.eval()
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else None
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        model.generate(
            input_ids=ids[:, :8],
            attention_mask=torch.ones_like(ids[:, :8]),
            generation_config=GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=0),
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start, int(out.shape[1] - ids.shape[1]) * args.gen_batch


def peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float16
    return get_available_flops(torch.device("cuda"), dtype)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.steps <= args.warmup:
        sys.exit("--steps must exceed --warmup")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    path, tokenizer = checkpoint_and_tokenizer(args)
    module, seconds, steps, flops = train(args, path, tokenizer)
    gen_seconds, gen_tokens = generation(args, module.model)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    peak = peak_flops(args)
    tokens = steps * args.batch * args.seq
    print(f"machine: {C.machine()}")
    print(
        f"model: {'tiny GLM 4 x 256' if args.tiny else 'GLM-4-9b shape (GlmConfig(), random weights)'}, "
        f"LoRA r{LORA['r']} q/k/v/o, quantization {args.quantization}, gradient checkpointing "
        f"{args.gradient_checkpointing}, precision {args.precision}, attention {args.attn}; micro-batch "
        f"{args.batch} x {args.seq} tokens, {steps} timed steps after {args.warmup}"
    )
    mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a (peak unknown)"
    print(
        C.table(
            [
                ("training tokens/s", tokens / seconds),
                ("training samples/s", steps * args.batch / seconds),
                ("model TFLOP/s", flops / seconds / 1e12),
                ("MFU", mfu),
                ("peak memory GiB", peak_mem),
                (
                    f"generation new tokens/s (batch {args.gen_batch}, prompt {args.gen_prompt}, {args.gen_new} new)",
                    gen_tokens / gen_seconds,
                ),
            ],
            ("figure", "value"),
        )
    )


if __name__ == "__main__":
    main()
