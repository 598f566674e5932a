"""Tokenize every instruction row of ../shared/data, cold, then again in a fresh process (the cache).

    python benchmarks/tokenization.py                   # the bundled tiny GLM-4-like BPE (what tiny_glm trains with)
    python benchmarks/tokenization.py --vocab 8000      # the 8k BPE of benchmarks/train_throughput.py
    python benchmarks/tokenization.py --all-formats     # also the same items in their other formats

(Not `tokenize.py`: that name would shadow the standard library's `tokenize` for the sibling scripts.)

Rows: every file the loaders read there, each loaded with `load_records` and rendered like a training split
(`tokenize_dataset`, chat template, prompt + answer, max length 1024): SOS-HL-1K `*_LLM.csv`, SocialCD-3K,
IMHI instruction_data (DR, dreaddit, SAD train+val; Irf, MultiWD val) and the IMHI expert examples.
`--all-formats` adds the SOS-HL-1K GBK `*_BERT.tsv` files and IMHI complete_data (the same items again).

The real GLM-4 tokenizer (151k vocabulary) cannot be downloaded here; the tiny one is a byte-level BPE
with GLM-4's special tokens and chat template, trained on the fixtures. Its small vocabulary splits text
into MORE tokens than GLM-4's does, so these times are on the slow side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common as C

IMHI = [
    "DR/train.csv",
    "DR/val.csv",
    "dreaddit/train.csv",
    "dreaddit/val.csv",
    "SAD/train.csv",
    "SAD/val.csv",
    "Irf/val.csv",
    "MultiWD/val.csv",
]
IMHI_TASK = {"DR": "dr", "dreaddit": "dreaddit", "SAD": "sad", "Irf": "irf", "MultiWD": "multiwd"}
EXPERT = {
    "CAMS": "cams",
    "DR": "dr",
    "Irf": "irf",
    "MultiWD": "multiwd",
    "SAD": "sad",
    "dreaddit": "dreaddit",
    "loneliness": "loneliness",
    "swmh": "swmh",
    "t-sid": "t_sid",
}
COMPLETE = {
    "DR/reddit_train.csv": "dr",
    "DR/reddit_valid.csv": "dr",
    "dreaddit/dreaddit-train.csv": "dreaddit",
    "dreaddit/val.csv": "dreaddit",
    "SAD/train.csv": "sad",
    "SAD/val.csv": "sad",
    "Irf/val.csv": "irf",
    "MultiWD/val.csv": "multiwd",
}


def sources(d: Path, all_formats: bool) -> list[tuple[str | None, Path]]:
    """(task or None for raw files that name their own task, path) of every file to tokenize."""
    out: list[tuple[str | None, Path]] = [(None, d / f"sos_hl_1k/suicide_{s}_LLM.csv") for s in ("train", "val")]
    out += [(None, d / f"socialcd_3k/{s}_data_with_header.tsv") for s in ("train", "test")]
    out += [(IMHI_TASK[f.split("/")[0]], d / C.INSTR / f) for f in IMHI]
    out += [(task, d / f"imhi/expert_examples/{name}.csv") for name, task in EXPERT.items()]
    if all_formats:
        out += [(None, d / f"sos_hl_1k/suicide_{s}_BERT.tsv") for s in ("train", "val")]
        out += [(task, d / "imhi/train_data/complete_data" / f) for f, task in COMPLETE.items()]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=0, help="0 = the fixture tiny BPE; N = the N-token real-text BPE")
    p.add_argument("--all-formats", action="store_true")
    p.add_argument("--num-proc", type=int, default=0, help="datasets.map processes (0/1 = in process, as training)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="tokenized-dataset cache (default: a fresh temporary folder, so the first run is cold)",
    )
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the second (cached) run's report
    return p.parse_args(argv)


def load_tokenizer(args):
    if args.vocab:
        import train_throughput as T

        targs = T.parse_args(["--vocab", str(args.vocab)])
        tokenizer, _ = T.build_tokenizer_and_checkpoint(targs, C.real_split("train", 10**9))
        return tokenizer, f"real-text BPE, {len(tokenizer):,} ids"
    from mentalglm.models.loading import load_tokenizer as _load

    tokenizer = _load(
        {
            "name": "tiny_glm",
            "tiny": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "initializer_range": 0.1},
        },
        C.default_cache_dir(),
    )
    return tokenizer, f"tiny GLM-4-like byte-level BPE (conf/model/tiny_glm.yaml), {len(tokenizer):,} ids"


def run(args, cache: Path) -> dict:
    """Load + tokenize every file; per-file and total seconds, rows, tokens and cache hits."""
    import datasets

    from mentalglm.data.loaders import load_records
    from mentalglm.data.render import tokenize_dataset

    datasets.disable_progress_bars()
    tokenizer, tok_name = load_tokenizer(args)
    d = C.require_shared_data()
    files, load_s, tok_s = [], 0.0, 0.0
    start = time.perf_counter()
    for task, path in sources(d, args.all_formats):
        t0 = time.perf_counter()
        records = load_records(task, path)
        t1 = time.perf_counter()
        ds, stats = tokenize_dataset(
            datasets.Dataset.from_list(records),
            tokenizer,
            chat=True,
            max_length=args.max_length,
            with_answer=True,
            cache_dir=cache,
            num_proc=args.num_proc or None,
        )
        t2 = time.perf_counter()
        load_s, tok_s = load_s + t1 - t0, tok_s + t2 - t1
        files.append(
            {
                "file": str(path.relative_to(d)),
                "rows": len(records),
                "tokens": stats["real_tokens"],
                "truncated": stats["n_truncated"],
                "too_long": stats["n_too_long"],
                "seconds": t2 - t1,
                "cache_hit": stats["cache_hit"],
            }
        )
    return {
        "files": files,
        "load_s": load_s,
        "tokenize_s": tok_s,
        "total_s": time.perf_counter() - start,
        "tokenizer": tok_name,
    }


def second_run(args, cache: Path) -> dict:
    """The same run in a new process, as a second `train.py` would be (nothing warm in memory)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--json",
        "--cache-dir",
        str(cache),
        "--vocab",
        str(args.vocab),
        "--num-proc",
        str(args.num_proc),
        "--max-length",
        str(args.max_length),
    ]
    if args.all_formats:
        cmd.append("--all-formats")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.json:
        print(json.dumps(run(args, args.cache_dir)))
        return
    with tempfile.TemporaryDirectory(prefix="mentalglm-tokenize-") as tmp:
        cache = args.cache_dir or Path(tmp)
        cold = run(args, cache)
        warm = second_run(args, cache)
    print(f"machine: {C.machine()}")
    print(f"tokenizer: {cold['tokenizer']}; max length {args.max_length}; num_proc {args.num_proc or 1}")
    rows = [
        (
            f["file"],
            f"{f['rows']:,}",
            f"{f['tokens']:,}",
            str(f["truncated"]),
            f["seconds"],
            w["seconds"],
            "hit" if w["cache_hit"] else "MISS",
        )
        for f, w in zip(cold["files"], warm["files"])
    ]
    n, tokens = sum(f["rows"] for f in cold["files"]), sum(f["tokens"] for f in cold["files"])
    rows.append(
        (
            "total",
            f"{n:,}",
            f"{tokens:,}",
            str(sum(f["truncated"] for f in cold["files"])),
            cold["tokenize_s"],
            warm["tokenize_s"],
            f"{sum(w['cache_hit'] for w in warm['files'])}/{len(rows)}",
        )
    )
    print(C.table(rows, ("file", "rows", "tokens", "truncated", "cold s", "cached s", "2nd run cache")))
    print(
        "\n"
        + C.table(
            [
                (
                    "load (parse files) + tokenize, first run",
                    "60 s",
                    f"{cold['total_s']:.1f} s",
                    f"{cold['total_s'] / 60:.2f}",
                ),
                ("tokenize only, first run (cold cache)", "-", f"{cold['tokenize_s']:.1f} s", "-"),
                (
                    "tokenize only, second run (new process)",
                    f"{cold['tokenize_s']:.1f} s (cold)",
                    f"{warm['tokenize_s']:.1f} s",
                    f"{cold['tokenize_s'] / max(warm['tokenize_s'], 1e-9):.0f}x faster",
                ),
            ],
            ("figure", "reference / budget", "ours", "ratio"),
        )
    )
    if not all(w["cache_hit"] for w in warm["files"]):
        sys.exit("the second run missed the datasets cache")


if __name__ == "__main__":
    main()
