"""Training speed next to the tools a user would pick instead: TRL's SFTTrainer and LLaMA-Factory, on the same
tiny GLM, rows and settings as the project's own run, interleaved round by round.

    pip install -e ".[peers]"                    # TRL, in the project's environment (it works with its versions)
    python benchmarks/peers.py                   # plain loop, TRL, the project (grouped, packed); 3 rounds
    python benchmarks/peers.py --llamafactory    # and LLaMA-Factory 0.9.5, in a virtual environment of its own

Every system trains the same LoRA (r8, alpha 32, dropout 0.1, q/k/v/o) on the same tiny GLM (4 layers x 256,
fp32, sdpa, random weights) from the same real rows (SOS-HL-1K, SocialCD-3K and IMHI DR/dreaddit/SAD train
rows from ../shared/data, split and rendered by the project), micro-batch 4, cutoff 1024, AdamW lr 1e-4 with
the same linear warm-up and decay, gradient clipping 1.0, no gradient checkpointing, for --steps optimizer
steps; the first --warmup steps are not timed. Real tokens/s counts the non-padding tokens of each system's own
timed batches, so padding is never counted as work.

  plain            PyTorch + peft loop, random padded batches, loss from `labels=` (every position): the reference
  trl              TRL SFTTrainer, padding_free=True, on the project's tokenization (same tokens and labels)
  llamafactory     LLaMA-Factory's run_exp (stage sft, finetuning lora, template glm4), its own tokenization
  project-grouped  MentalGLMModule under Lightning with InstructionDataModule's loader, data.batching=grouped
  project-packed   the same, data.batching=packed (per-sample attention)

LLaMA-Factory 0.9.5 pins transformers <= 5.6.0 and peft <= 0.18.1, so it never goes into the project's
environment: --llamafactory builds --llamafactory-venv once (torch==2.13.0 from this disk as a constraint,
PyPI's torchvision removed) and runs benchmarks/peer_llamafactory.py in it, one process per round.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import _common as C
import torch
from train_throughput import (
    LORA,
    OPTIMIZER,
    build_tokenizer_and_checkpoint,
    lightning_run,
    load_lora_model,
    train_loader,
)
from train_throughput import plain_run as throughput_plain_run

from mentalglm.runtime.throughput import real_tokens

SYSTEMS = ("plain", "trl", "llamafactory", "project-grouped", "project-packed")
LLAMAFACTORY = "llamafactory==0.9.5"
DRIVER = Path(__file__).with_name("peer_llamafactory.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-group", type=int, default=600, help="rows of SOS-HL-1K, of SocialCD-3K and of IMHI each")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (every system once per round)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--bucket-batches", type=int, default=C.data_default("bucket_batches"))
    p.add_argument("--vocab", type=int, default=8000, help="BPE trained on the train rows (as train_throughput.py)")
    p.add_argument("--llamafactory", action="store_true", help="also run LLaMA-Factory (builds its venv once)")
    p.add_argument("--llamafactory-venv", type=Path, default=C.default_cache_dir() / "llamafactory-0.9.5-venv")
    p.add_argument("--skip", default="", help="comma-separated systems to leave out")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=C.default_cache_dir())
    return p.parse_args(argv)


def timed_sum(values: list[int], warmup: int) -> int:
    return sum(values[warmup:])


# ----------------------------------------------------------------------------- the reference and the project
def plain_run(args, path: Path, batches: list[dict]) -> dict:
    """A hand-written PyTorch + peft loop over random padded batches, loss from `labels=`."""
    seconds, losses = throughput_plain_run(args, path, batches, selection="all")
    return {
        "seconds": seconds,
        "tokens": timed_sum([real_tokens(b) for b in batches], args.warmup),
        "loss": sum(losses) / len(losses),
    }


def project_run(args, tokenizer, path: Path, batches: list[dict], mode: str) -> dict:
    from mentalglm.models import packed_attention

    packed_attention.register()
    seconds, losses = lightning_run(args, tokenizer, path, batches, attn=packed_attention.attention_for(mode, "sdpa"))
    return {
        "seconds": seconds,
        "tokens": timed_sum([real_tokens(b) for b in batches], args.warmup),
        "loss": sum(losses) / len(losses),
    }


# ----------------------------------------------------------------------------- TRL
def trl_run(args, tokenizer, path: Path, ds) -> dict:
    """TRL's SFTTrainer with padding_free (the sequences of a micro-batch flattened into one row, positions
    restarting per sequence, so transformers masks attention per sequence) on the project's token ids and labels."""
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    counted: list[int] = []

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counted.append(real_tokens(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    class Timer(TrainerCallback):
        start = end = None

        def on_step_begin(self, _args, state, control, **kw):
            if state.global_step == args.warmup:
                Timer.start = time.perf_counter()

        def on_step_end(self, _args, state, control, **kw):
            Timer.end = time.perf_counter()

    train = datasets.Dataset.from_dict({"input_ids": ds["input_ids"], "labels": ds["labels"]})
    model = load_lora_model(path, args.seed)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            max_steps=args.steps,
            learning_rate=OPTIMIZER["lr"],
            weight_decay=OPTIMIZER["weight_decay"],
            adam_beta1=OPTIMIZER["betas"][0],
            adam_beta2=OPTIMIZER["betas"][1],
            lr_scheduler_type="linear",
            warmup_steps=max(1, round(OPTIMIZER["warmup_ratio"] * args.steps)),
            max_grad_norm=1.0,
            padding_free=True,
            max_length=None,  # the rows are truncated to --max-length already (padding_free requires None)
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            use_cpu=True,
            seed=args.seed,
            logging_steps=10**6,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        trainer = CountingTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # its end-of-run dict would land between the table's lines
        trainer.add_callback(Timer())
        result = trainer.train()
    return {
        "seconds": Timer.end - Timer.start,
        "tokens": timed_sum(counted, args.warmup),
        "loss": result.training_loss,
    }


# ----------------------------------------------------------------------------- LLaMA-Factory
def ensure_llamafactory(venv: Path) -> Path:
    """A venv with LLaMA-Factory, built once: its pins would downgrade the project's transformers and peft."""
    python = venv / "bin" / "python"
    ready = venv / "ready"
    if ready.is_file():
        return python
    print(f"building {venv} with {LLAMAFACTORY} (once; a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, LLAMAFACTORY, "-c", str(constraints)], check=True)
    # PyPI's torchvision is built against another torch: its import fails beside torch 2.13.0 from this disk.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=False)
    # LLaMA-Factory imports torchaudio unconditionally, and PyPI's torchaudio libraries fail to load beside this
    # torch; without them torchaudio imports (audio left unavailable), which a text benchmark never needs.
    find = "import importlib.util as u; print(u.find_spec('torchaudio').submodule_search_locations[0])"
    audio = subprocess.run([str(python), "-c", find], capture_output=True, text=True)
    if audio.returncode == 0:
        for lib in (Path(audio.stdout.strip()) / "lib").glob("*.so"):
            lib.rename(lib.with_name(lib.name + ".disabled"))
    subprocess.run([str(python), "-c", "import llamafactory.train.tuner"], check=True, env=llamafactory_env())
    ready.write_text(LLAMAFACTORY + "\n")
    return python


def llamafactory_env() -> dict:
    # DISABLE_VERSION_CHECK: LLaMA-Factory refuses transformers it has not listed; the venv holds its own pins.
    return {**os.environ, "DISABLE_VERSION_CHECK": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def llamafactory_run(args, python: Path, path: Path, records: list[dict], work: Path) -> dict:
    rows = work / "rows.jsonl"
    if not rows.is_file():
        rows.write_text("".join(json.dumps({"query": r["query"], "answer": r["answer"]}) + "\n" for r in records))
    settings = {
        "model": str(path),
        "rows": str(rows),
        "work": str(work),
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
        "threads": args.threads,
        "lora": LORA,
        "optimizer": OPTIMIZER,
    }
    proc = subprocess.run(
        [str(python), str(DRIVER), json.dumps(settings)], env=llamafactory_env(), capture_output=True, text=True
    )
    result = next((line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")), None)
    if proc.returncode or result is None:
        sys.exit(f"LLaMA-Factory run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(result)


def peer_versions(python: Path | None) -> str:
    def local(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    out = [f"{n} {local(n)}" for n in ("torch", "transformers", "peft", "lightning", "trl")]
    if python is not None:
        names = "('llamafactory', 'transformers', 'peft')"
        probe = f"from importlib.metadata import version as v; print(*[v(n) for n in {names}])"
        lf, tr, pe = subprocess.run([str(python), "-c", probe], capture_output=True, text=True).stdout.split()
        out.append(f"LLaMA-Factory {lf} (its venv: transformers {tr}, peft {pe})")
    return ", ".join(out)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "transformers", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    if not args.llamafactory:
        skip.add("llamafactory")
    unknown = skip - set(SYSTEMS)
    if unknown:
        sys.exit(f"--skip: unknown systems {sorted(unknown)} (known: {', '.join(SYSTEMS)})")
    systems = [s for s in SYSTEMS if s not in skip]
    if "trl" in systems:
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit('TRL is not installed: pip install -e ".[peers]" (or --skip trl)')
    python = ensure_llamafactory(args.llamafactory_venv) if "llamafactory" in systems else None

    records = C.real_split("train", args.per_group, seed=args.seed)
    tokenizer, path = build_tokenizer_and_checkpoint(args, C.real_split("train", 10**9, seed=args.seed))
    ds, _ = C.tokenize(
        records, tokenizer, with_answer=True, max_length=args.max_length, cache_dir=args.cache_dir / "datasets"
    )
    loaders = {m: train_loader(tokenizer, ds, m, args) for m in ("random", "grouped", "packed")}
    batches = {m: list(loader)[: args.steps] for m, loader in loaders.items()}
    short = [m for m, b in batches.items() if len(b) < args.steps]
    if short or args.steps <= args.warmup:
        sys.exit(f"--steps {args.steps} needs more rows (--per-group) for {short} and must exceed --warmup")
    print(f"machine: {C.machine()}")
    print(f"versions: {peer_versions(python)}")
    print(
        f"data: {len(records)} train rows, {sum(ds['length']):,} real tokens; tiny GLM "
        f"{C.TINY_4x256['num_layers']}x{C.TINY_4x256['hidden_size']}, LoRA r{LORA['r']} q/k/v/o, fp32, micro-batch "
        f"{args.batch_size}, cutoff {args.max_length}, {args.steps} steps ({args.warmup} untimed), {args.rounds} "
        "interleaved rounds"
    )
    runs = {
        "plain": lambda: plain_run(args, path, copy.deepcopy(batches["random"])),
        "trl": lambda: trl_run(args, tokenizer, path, ds),
        "llamafactory": lambda: llamafactory_run(args, python, path, records, args.cache_dir / "peers-llamafactory"),
        "project-grouped": lambda: project_run(args, tokenizer, path, copy.deepcopy(batches["grouped"]), "grouped"),
        "project-packed": lambda: project_run(args, tokenizer, path, copy.deepcopy(batches["packed"]), "packed"),
    }
    (args.cache_dir / "peers-llamafactory").mkdir(parents=True, exist_ok=True)
    speeds: dict[str, list[float]] = {s: [] for s in systems}
    losses: dict[str, float] = {}
    for r in range(args.rounds):
        for s in systems:
            out = runs[s]()
            speeds[s].append(out["tokens"] / out["seconds"])
            losses[s] = out["loss"]
            print(
                f"  round {r + 1}/{args.rounds} {s:16s} {out['tokens'] / out['seconds']:8,.0f} real tok/s "
                f"({out['tokens']:,} tokens in {out['seconds']:.1f} s, loss {out['loss']:.3f}; "
                f"load {os.getloadavg()[0]:.2f})",
                file=sys.stderr,
            )
    median = {s: C.median(v) for s, v in speeds.items()}
    project = median.get("project-grouped")
    rows = []
    for s in systems:
        vs_plain = f"{median[s] / median['plain']:.2f}" if "plain" in median else "-"
        vs_project = f"{project / median[s]:.2f}x" if project and s != "project-grouped" else "-"
        rows.append((s, f"{median[s]:,.0f}", vs_plain, vs_project, f"{losses[s]:.3f}"))
    header = (
        "system",
        f"real tok/s (median of {args.rounds})",
        "vs plain padded loop",
        "project (grouped) is",
        "mean loss",
    )
    print("\n" + C.table(rows, header))
    goals = [("llamafactory", 2.0), ("trl", 1.5)]
    for peer, goal in goals:
        if project and peer in median:
            ratio = project / median[peer]
            print(f"goal: project-grouped >= {goal}x {peer}: {ratio:.2f}x ({'met' if ratio >= goal else 'NOT met'})")


if __name__ == "__main__":
    main()
