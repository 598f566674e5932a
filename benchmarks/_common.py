"""Shared pieces of the benchmarks: the real data mix, the tiny GLM, timing and the result table."""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mentalglm.data.paths import shared_data_dir  # noqa: E402

INSTR = "imhi/train_data/instruction_data"
# The benchmark model: GLM-4's architecture, 4 layers x 256 hidden.
TINY_4x256 = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "initializer_range": 0.1}
# The real data mix: equal parts SOS-HL-1K, SocialCD-3K and IMHI (DR/dreaddit/SAD in thirds).
MIX = {"sos_hl_1k": 3, "socialcd_3k": 3, "dr": 1, "dreaddit": 1, "sad": 1}


def default_cache_dir() -> Path:
    """train.py's default cache (paths.cache_dir), so the tiny checkpoint is built only once."""
    return Path(os.environ.get("MENTALGLM_OUTPUT", ROOT / "outputs")) / ".cache"


def data_default(key: str):
    """A default of the data config (mentalglm/config.py DataConfig), so the benchmarks measure what training uses."""
    from mentalglm.config import DataConfig

    return getattr(DataConfig(name="benchmark"), key)


def data_config(**overrides):
    from mentalglm.config import DataConfig

    return DataConfig(name="benchmark", **overrides)


def require_shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        sys.exit("the benchmarks need the real data in ../shared/data (or $MENTALGLM_DATA)")
    return d


def shared_specs(d: Path) -> dict:
    """The tasks and paper splits of conf/data/shared.yaml (what ../shared/data holds)."""
    return {
        "sos_hl_1k": {
            "train": d / "sos_hl_1k/suicide_train_LLM.csv",
            "val_size": 250,
            "test": d / "sos_hl_1k/suicide_val_LLM.csv",
        },
        "socialcd_3k": {
            "train": d / "socialcd_3k/train_data_with_header.tsv",
            "val_size": 682,
            "test": d / "socialcd_3k/test_data_with_header.tsv",
        },
        "dr": {"train": d / INSTR / "DR/train.csv", "val": d / INSTR / "DR/val.csv"},
        "dreaddit": {"train": d / INSTR / "dreaddit/train.csv", "val": d / INSTR / "dreaddit/val.csv"},
        "sad": {"train": d / INSTR / "SAD/train.csv", "val": d / INSTR / "SAD/val.csv"},
    }


def sample_mix(records: list[dict], per_group: int, seed: int) -> list[dict]:
    """`per_group` SOS-HL-1K, `per_group` SocialCD-3K and `per_group` IMHI rows (a third each of DR,
    dreaddit, SAD), drawn with a fixed seed, in a shuffled order."""
    rng = random.Random(seed)
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    out = []
    for task, weight in MIX.items():
        rows = by_task.get(task, [])
        k = min(len(rows), round(per_group * weight / 3))
        out += rng.sample(rows, k)
    rng.shuffle(out)
    return out


def real_split(split: str, per_group: int, seed: int = 0) -> list[dict]:
    from mentalglm.data.splits import build_splits

    records = build_splits(shared_specs(require_shared_data()), seed=42)[split]
    return sample_mix(records, per_group, seed)


def tiny_checkpoint(cache_dir: Path, sizes: dict) -> Path:
    from mentalglm.models.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(cache_dir, **sizes)


def model_cfg(sizes: dict, attn: str = "sdpa") -> dict:
    """A `model` config (conf/model/tiny_glm.yaml) for MentalGLMModule and load_base_model."""
    return {
        "name": "tiny_glm",
        "pretrained": None,
        "chat": True,
        "dtype": "float32",
        "attn_implementation": attn,
        "tiny": dict(sizes),
    }


def load_tokenizer(cache_dir: Path, sizes: dict):
    from mentalglm.models.loading import load_tokenizer as _load

    return _load(model_cfg(sizes), cache_dir)


def tokenize(records: list[dict], tokenizer, *, with_answer: bool, max_length: int = 1024, cache_dir=None):
    import datasets

    from mentalglm.data.render import tokenize_dataset

    ds, stats = tokenize_dataset(
        datasets.Dataset.from_list(records),
        tokenizer,
        chat=True,
        max_length=max_length,
        with_answer=with_answer,
        cache_dir=cache_dir,
    )
    return ds, stats


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


def table(rows: list[tuple], header: tuple) -> str:
    """A GitHub-flavoured markdown table (pasted as is into benchmarks/README.md)."""
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else f"{c:,.2f}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
