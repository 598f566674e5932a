"""The GPU check: GLM-4-9b-shaped LoRA and QLoRA figures in one prepared run that fits a lent device's minutes.

    python benchmarks/gpu_check.py --out "$OUT"          # one H100/H200: under 8 minutes (benchmarks/README.md)
    python benchmarks/gpu_check.py --tiny --out DIR      # the dry run: every step on the tiny GLM, on a CPU

The model is `GlmConfig()` (GLM-4-9b's shape: 40 layers, hidden 4096, vocabulary 151,552) with random bf16
weights created on the GPU: no checkpoint is written or read. It goes through the project's own path: `apply_lora`
(r8 q/k/v/o), `MentalGLMModule` under a Lightning Trainer (bf16-mixed), the loss of mentalglm/models/loss.py,
micro-batch 4 of full 1,024-token rows whose last 34% are supervised (the answer share of the paper's mix), and
for generation the grouped (length-sorted) validation batches of the bundled C-IMHI fixtures. Steps:

  environment        the device, its dense bf16 peak (Lightning's table, or --peak-tflops) and the versions
  model              the bf16 base built on the device
  lora_bf16          training tokens/s, model TFLOP/s, MFU, peak memory
  lora_bf16_chunked  the same with model.loss_chunk_size (the logits' memory)
  generation         batched label-only validation answers vs per-sample full answers, items/s
  likelihood         validation.mode=likelihood vs label-only generation on the same batches, items/s
  qlora_4bit         the base quantized to 4 bits on the device (bitsandbytes NF4, the project's
                     BitsAndBytesConfig), gradient checkpointing: tokens/s, peak memory against a 24 GB card

Each step has its own time cap; after every step gpu_check.json and gpu_check.md in --out hold every figure so
far, so a step that fails or runs out of time costs only itself. The random model never stops early: each
answer runs to its token cap, as the caps say. Needs only what the device image has plus omegaconf, its antlr4
runtime and bitsandbytes (benchmarks/gpu_check_wheels.txt).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import signal
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # also when run through runpy (the dry-run test)

from _timing import StepTimer, sync  # noqa: E402

from mentalglm.fileio.atomic import dumps_json, write_files_atomic  # noqa: E402

LORA = {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
OPTIMIZER = {"lr": 1.0e-4, "weight_decay": 0.0, "warmup_ratio": 0.01}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
CARD_24GB = 24e9 / 2**30  # a "24 GB" card, in GiB
# Per-step caps (seconds) on a GPU: 6.5 minutes in all, so with imports and the wheels' install the run stays
# under 8 (the dry run's caps are 20 times these).
CAPS = {
    "environment": 15,
    "model": 45,
    "lora_bf16": 60,
    "lora_bf16_chunked": 60,
    "generation": 75,
    "likelihood": 45,
    "qlora_4bit": 90,
}


class StepTimeout(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where gpu_check.json and gpu_check.md go ($OUT)")
    p.add_argument("--tiny", action="store_true", help="the tiny GLM on a CPU: the dry run of every step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="training steps per step, the first --warmup untimed")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loss-chunk", type=int, default=256, help="model.loss_chunk_size of lora_bf16_chunked")
    p.add_argument("--per-sample", type=int, default=4, help="items answered one by one (full answers)")
    p.add_argument("--full-tokens", type=int, default=256, help="new tokens of a full answer")
    p.add_argument("--val-items", type=int, default=None, help="the first N validation fixtures (default: all 90)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if Lightning lacks it")
    p.add_argument("--cap-scale", type=float, default=1.0, help="multiplies every step's time cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=ROOT / "outputs" / ".cache", help="the offline tokenizer")
    args = p.parse_args(argv)
    if args.tiny:
        args.seq, args.batch, args.steps, args.warmup = 64, 2, 3, 1
        args.per_sample, args.full_tokens, args.loss_chunk, args.val_items = 2, 16, 16, 8
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    return args


@contextmanager
def time_cap(seconds: float):
    """Raise StepTimeout in the step after `seconds` (between CUDA launches: a kernel is never cut)."""

    def expire(signum, frame):
        raise StepTimeout(f"over its cap of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Check:
    """The steps' shared state and the report written after each step."""

    def __init__(self, args):
        self.args = args
        self.report: dict = {
            "script": "benchmarks/gpu_check.py",
            "mode": "tiny (CPU dry run)" if args.tiny else "GLM-4-9b shape",
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")} | {"lora": LORA},
            "steps": {},
        }
        self.tokenizer = self.base = self.lora_model = None
        self.peak_flops: float | None = None

    def run(self, name: str, fn) -> None:
        cap = CAPS[name] * self.args.cap_scale * (20 if self.args.tiny else 1)
        started = time.perf_counter()
        try:
            with time_cap(cap):
                figures = fn()
            entry = {"status": "ok", **figures}
        except StepTimeout as e:
            entry = {"status": f"timed out: {e}"}
        except Exception as e:  # a step that fails costs only itself; the traceback goes to the log
            traceback.print_exc()
            entry = {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        entry["seconds"] = round(time.perf_counter() - started, 1)
        self.report["steps"][name] = entry
        self.write()
        print(f"[{name}] {entry['status']} in {entry['seconds']} s", flush=True)

    def write(self) -> None:
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        write_files_atomic(
            {out / "gpu_check.json": dumps_json(self.report), out / "gpu_check.md": markdown(self.report)}
        )


# ----------------------------------------------------------------------------- steps
def environment(check: Check) -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "peft", "lightning", "bitsandbytes", "omegaconf"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    figures = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU", "versions": versions}
    if check.args.peak_tflops:
        check.peak_flops, source = check.args.peak_tflops * 1e12, "--peak-tflops"
    elif torch.cuda.is_available():
        from lightning.fabric.utilities.throughput import get_available_flops

        check.peak_flops, source = get_available_flops(device(), torch.bfloat16), "Lightning's table"
    else:
        source = "none (CPU)"
    figures["peak_bf16_tflops"] = round(check.peak_flops / 1e12, 1) if check.peak_flops else None
    figures["peak_source"] = source
    if torch.cuda.is_available():
        figures["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return figures


def tiny_tokenizer(check: Check):
    """A GLM-4 tokenizer built offline (the tiny GLM's: its ids fit any GLM vocabulary), for prompts and pad ids."""
    from transformers import AutoTokenizer

    from mentalglm.models.tiny import ensure_tiny_checkpoint

    return AutoTokenizer.from_pretrained(ensure_tiny_checkpoint(check.args.cache_dir, hidden_size=64, num_layers=1))


def glm_config(check: Check):
    from transformers import GlmConfig

    if check.args.tiny:
        return GlmConfig(**TINY, intermediate_size=128, vocab_size=len(check.tokenizer), pad_token_id=0)
    return GlmConfig()


def build_model(check: Check) -> dict:
    from transformers import GlmForCausalLM

    check.tokenizer = tiny_tokenizer(check)
    torch.manual_seed(check.args.seed)
    reset_peak()
    start = time.perf_counter()
    with torch.device(device()):
        check.base = GlmForCausalLM._from_config(glm_config(check), dtype=torch.bfloat16)
    check.base.config.use_cache = False
    sync()
    params = sum(p.numel() for p in check.base.parameters())
    return {"parameters": params, "build_seconds": round(time.perf_counter() - start, 1), "peak_memory_gib": peak_gib()}


def random_batches(check: Check, vocab: int) -> list[dict]:
    a = check.args
    g = torch.Generator().manual_seed(a.seed)
    out = []
    for _ in range(a.steps):
        ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g)
        labels = ids.clone()
        labels[:, : a.seq - max(1, round(0.34 * a.seq))] = -100  # the prompt: no loss
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def module_for(check: Check, model, loss_chunk: int | None = None, **generation):
    from mentalglm.models.module import MentalGLMModule

    module = MentalGLMModule(
        model={
            "name": "gpu_check",
            "pretrained": None,
            "chat": True,
            "dtype": "bfloat16",
            "loss_chunk_size": loss_chunk,
        },
        lora=LORA,
        optimizer=OPTIMIZER,
        generation=generation,
        tasks=["sos_hl_1k", "socialcd_3k", "cp"],
        tokenizer=check.tokenizer,
    )
    module.model = model  # built on the device above: configure_model keeps it
    return module


def train_figures(check: Check, model, loss_chunk: int | None = None) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from mentalglm.models.loss import supervised_positions
    from mentalglm.runtime.throughput import FlopSpec

    a = check.args
    timer = StepTimer(a.warmup)
    module = module_for(check, model, loss_chunk)
    trainer = L.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=a.steps,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=1.0,
    )
    batches = random_batches(check, model.config.vocab_size)
    reset_peak()
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    seconds, steps = timer.end - timer.start, a.steps - a.warmup
    spec = FlopSpec.from_model(model)
    flops = spec.train_flops([a.seq] * a.batch, supervised_positions(batches[0]["labels"])) * steps
    figures = {
        "tokens_per_s": round(steps * a.batch * a.seq / seconds, 1),
        "samples_per_s": round(steps * a.batch / seconds, 3),
        "model_tflops": round(flops / seconds / 1e12, 2),
        "mfu": round(flops / seconds / check.peak_flops, 4) if check.peak_flops else None,
        "peak_memory_gib": peak_gib(),
        "timed_steps": steps,
        "loss_first_last": [round(timer.losses[0], 4), round(timer.losses[-1], 4)],
    }
    if loss_chunk:
        figures["loss_chunk_size"] = loss_chunk
    return figures


def lora_bf16(check: Check) -> dict:
    from mentalglm.models.loading import apply_lora

    check.lora_model = apply_lora(check.base, LORA)
    return train_figures(check, check.lora_model)


def lora_bf16_chunked(check: Check) -> dict:
    figures = train_figures(check, check.lora_model, check.args.loss_chunk)
    plain = check.report["steps"].get("lora_bf16", {}).get("peak_memory_gib")
    if plain and figures["peak_memory_gib"]:
        figures["peak_memory_vs_lora_bf16"] = round(figures["peak_memory_gib"] / plain, 3)
    return figures


def validation_batches(check: Check, batch_size: int) -> list[dict]:
    """The C-IMHI fixtures' validation prompts as the project batches them for generation: sorted by length."""
    from mentalglm.data.render import render_prompt

    items = []
    lines = (ROOT / "mentalglm/fixtures/c_imhi/val.jsonl").read_text(encoding="utf-8").splitlines()
    for line in lines[: check.args.val_items]:
        row = json.loads(line)
        items.append((render_prompt(check.tokenizer, row["instruction"], chat=True), row))
    items.sort(key=lambda item: len(item[0]))
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batches.append(
            {
                "prompts": [p for p, _ in chunk],
                "task": [r["task"] for _, r in chunk],
                "id": [str(r["id"]) for _, r in chunk],
                "index": [start + i for i in range(len(chunk))],
                "aspect": ["" for _ in chunk],
                "labels": [r["labels"] for _, r in chunk],
            }
        )
    return batches


def eval_module(check: Check):
    """The module as validation runs it: the project's eval batch size and label-only token cap (smaller in the
    dry run)."""
    from mentalglm.config import DataConfig, GenerationConfig

    label_tokens = 8 if check.args.tiny else GenerationConfig().val_max_new_tokens
    batch_size = 4 if check.args.tiny else DataConfig(name="gpu_check").eval_batch_size
    module = module_for(check, check.lora_model, max_new_tokens=check.args.full_tokens, val_max_new_tokens=label_tokens)
    check.lora_model.eval()
    check.lora_model.config.use_cache = True
    return module, batch_size, label_tokens


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def generation(check: Check) -> dict:
    module, batch_size, label_tokens = eval_module(check)
    batches = validation_batches(check, batch_size)
    n = sum(len(b["prompts"]) for b in batches)
    with torch.inference_mode(), torch.autocast(device().type, dtype=torch.bfloat16):
        module.generate_texts(batches[0]["prompts"][:2], full=False)  # warm-up
        batched_s, _ = timed(lambda: [module.generate_texts(b["prompts"], full=False) for b in batches])
        singles = [p for b in batches for p in b["prompts"]][: check.args.per_sample]
        single_s, _ = timed(lambda: [module.generate_texts([p], full=True) for p in singles])
    batched, single = n / batched_s, len(singles) / single_s
    return {
        "items": n,
        "eval_batch_size": batch_size,
        "label_only_tokens": label_tokens,
        "full_answer_tokens": check.args.full_tokens,
        "batched_label_only_items_per_s": round(batched, 2),
        "per_sample_full_items_per_s": round(single, 3),
        "per_sample_items": len(singles),
        "speedup": round(batched / single, 1),
    }


def likelihood(check: Check) -> dict:
    module, batch_size, _ = eval_module(check)
    batches = validation_batches(check, batch_size)
    n = sum(len(b["prompts"]) for b in batches)
    with torch.inference_mode(), torch.autocast(device().type, dtype=torch.bfloat16):
        module._likelihood_rows(batches[0])  # warm-up
        like_s, rows = timed(lambda: [r for b in batches for r in module._likelihood_rows(b)])
        gen_s, _ = timed(lambda: [module.generate_texts(b["prompts"], full=False) for b in batches])
    return {
        "items": n,
        "likelihood_items_per_s": round(n / like_s, 2),
        "label_only_generation_items_per_s": round(n / gen_s, 2),
        "speedup": round(gen_s / like_s, 2),
        "target": ">= 3x",
        "rows": len(rows),
    }


def qlora_4bit(check: Check) -> dict:
    from transformers import GlmForCausalLM

    from mentalglm.models.loading import apply_lora, quantization_config

    base = check.lora_model.unload() if check.lora_model is not None else check.base
    state = base.state_dict()
    config = base.config
    check.base = check.lora_model = None
    reset_peak()
    start = time.perf_counter()
    quantized = GlmForCausalLM.from_pretrained(
        None,
        config=config,
        state_dict=state,
        quantization_config=quantization_config("4bit", torch.bfloat16),
        dtype=torch.bfloat16,
        device_map={"": 0} if torch.cuda.is_available() else None,
    )
    sync()
    quantize_s = time.perf_counter() - start
    del state, base
    quantized.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    quantized.enable_input_require_grads()
    quantized.config.use_cache = False
    layer = type(quantized.model.layers[0].self_attn.q_proj).__name__
    model = apply_lora(quantized, LORA)
    figures = train_figures(check, model)
    figures |= {"quantize_seconds": round(quantize_s, 1), "q_proj": layer}
    if figures["peak_memory_gib"] is not None:
        figures["fits_24gb_card"] = figures["peak_memory_gib"] < CARD_24GB
    return figures


# ----------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    steps = report["steps"]
    env = steps.get("environment", {})
    lines = [
        f"# GPU check ({report['mode']}), {report['started']}",
        "",
        f"Device: {env.get('device', '?')}; dense bf16 peak {env.get('peak_bf16_tflops')} TFLOP/s "
        f"({env.get('peak_source', '?')}); versions {env.get('versions', {})}.",
        "",
        "| step | status | s | figures |",
        "|---|---|---:|---|",
    ]
    for name, entry in steps.items():
        if name == "environment":
            continue
        figures = ", ".join(f"{k} {v}" for k, v in entry.items() if k not in ("status", "seconds"))
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']} | {figures} |")
    return "\n".join(lines) + "\n"


STEPS = {
    "environment": environment,
    "model": build_model,
    "lora_bf16": lora_bf16,
    "lora_bf16_chunked": lora_bf16_chunked,
    "generation": generation,
    "likelihood": likelihood,
    "qlora_4bit": qlora_4bit,
}


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    check = Check(args)
    for name, fn in STEPS.items():
        if name not in ("environment", "model") and check.base is None and check.lora_model is None:
            check.report["steps"][name] = {"status": "skipped: no model", "seconds": 0.0}
            check.write()
            continue
        check.run(name, lambda fn=fn: fn(check))
    print(markdown(check.report))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    failed = [n for n, e in check.report["steps"].items() if e["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
