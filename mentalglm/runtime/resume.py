"""Where a resumed run continues: the run directory to reuse, and which stages of it are already done.

Hydra gives every run a fresh timestamped directory, so "rerun the same command with resume=true" has to
pick the interrupted run's directory before Hydra creates one: `hydra.run.dir` goes through the
`mentalglm.run_dir` resolver registered here (train.py and evaluate.py register it on import). Kept free of
torch/lightning imports so registering it costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from mentalglm.fileio.atomic import write_json_atomic

# Something a rerun can continue from: a training checkpoint, a finished stage, evaluate.py's partial predictions.
RESUMABLE = ("stage_*/checkpoints/last.ckpt", "stage_*/stage_done.json", "predictions.partial.jsonl")
# What a run writes last: train.py's summary.json, evaluate.py's metrics.json.
FINISHED = ("summary.json", "metrics.json")
STAGE_DONE = "stage_done.json"


def wants_resume(resume, ckpt_path=None) -> bool:
    return resume is True or str(resume).lower() == "true" or ckpt_path == "last"


def is_resumable(run_dir: Path) -> bool:
    if any((run_dir / name).is_file() for name in FINISHED):
        return False
    return any(next(run_dir.glob(pattern), None) is not None for pattern in RESUMABLE)


def latest_resumable(runs_dir: str | Path) -> Path | None:
    """The newest unfinished run under `runs_dir` that left something to continue from."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    # Run directories are named by start time (%Y-%m-%d_%H-%M-%S), so name order is age order.
    for run in sorted((p for p in runs_dir.iterdir() if p.is_dir()), reverse=True):
        if is_resumable(run):
            return run
    return None


def run_dir(runs_dir: str, fresh_name: str, resume=False, ckpt_path=None) -> str:
    """hydra.run.dir: `runs_dir/fresh_name`, or with resume=true (ckpt_path=last) the newest resumable run,
    or resume=PATH that run directory."""
    if resume not in (None, False, "", "false", "False") and not wants_resume(resume):
        return str(resume)
    if wants_resume(resume, ckpt_path):
        found = latest_resumable(runs_dir)
        if found is not None:
            return str(found)
    return str(Path(runs_dir) / fresh_name)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mentalglm.run_dir"):
        OmegaConf.register_new_resolver("mentalglm.run_dir", run_dir)


# ----------------------------------------------------------------------------- finished stages
def mark_stage_done(stage_dir: Path, record: dict) -> None:
    """Written after a stage's adapter is exported (and its test run): a resumed run reuses it as is."""
    write_json_atomic(stage_dir / STAGE_DONE, record)


def stage_done(stage_dir: Path) -> dict | None:
    path = stage_dir / STAGE_DONE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if not (Path(record["best_adapter"]) / "adapter_config.json").is_file():
        return None  # the exported adapter is gone: redo the stage
    return record
