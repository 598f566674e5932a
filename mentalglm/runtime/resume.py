"""Where a resumed run continues: the run directory to reuse, and which stages of it are already done.

Hydra gives every run a fresh timestamped directory, so "rerun the same command with resume=true" has to
pick the interrupted run's directory before Hydra creates one: `hydra.run.dir` goes through the
`mentalglm.run_dir` resolver registered here (train.py and evaluate.py register it on import). Kept free of
torch/lightning imports so registering it costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from omegaconf import OmegaConf

from mentalglm.errors import OutputError
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
    lock = run_dir / LOCK
    if lock.is_file():  # another process is running it now
        try:
            pid, host = lock.read_text().split()
            if host == socket.gethostname() and _alive(int(pid)):
                return True  # picked, so that claiming it says it is in use rather than starting a new run
        except (OSError, ValueError):
            pass
    return any(next(run_dir.glob(pattern), None) is not None for pattern in RESUMABLE)


def latest_resumable(runs_dir: str | Path) -> Path | None:
    """The newest unfinished run under `runs_dir` that left something to continue from."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    # Run directories are named by start time (%Y-%m-%d_%H-%M-%S, then the pid), so name order is age order.
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


_STAMP: dict[str, str] = {}


def stamp(fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """The start time of this process, and its pid: two runs started in the same second never share a directory
    (the time comes first, so name order stays age order). Computed once per process and format."""
    if fmt not in _STAMP:
        _STAMP[fmt] = f"{time.strftime(fmt)}_{os.getpid()}"
    return _STAMP[fmt]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mentalglm.run_dir"):
        OmegaConf.register_new_resolver("mentalglm.run_dir", run_dir)
    if not OmegaConf.has_resolver("mentalglm.stamp"):
        # Cached in the config (as Hydra's `now`): a sweep's jobs copy the driver's cache, so jobs that a launcher
        # runs in processes of their own (submitit) resolve the sweep directory to the driver's.
        OmegaConf.register_new_resolver("mentalglm.stamp", stamp, use_cache=True)


# ----------------------------------------------------------------------------- one process per run directory
LOCK = ".in_use"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_worker_rank() -> bool:
    """A data-parallel process other than the first: it shares the first one's run directory, by design."""
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


@contextlib.contextmanager
def claim_run_dir(run: str | Path) -> Iterator[None]:
    """Hold `run` for this process: another process (a second run started into it, a second resume=true) stops
    with a clear error instead of writing into the same files. A lock left by a process that died is taken over."""
    run = Path(run)
    if is_worker_rank():
        yield
        return
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK
    me = f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid, host = lock.read_text().split()
            except (OSError, ValueError):
                lock.unlink(missing_ok=True)
                continue
            if host == socket.gethostname() and _alive(int(pid)) and int(pid) != os.getpid():
                raise OutputError(
                    f"{run} is in use by process {pid}: wait for it to finish, or give this run "
                    "another directory (hydra.run.dir=...)"
                ) from None
            lock.unlink(missing_ok=True)  # left by a process that is gone
            continue
        try:
            os.write(fd, me.encode())  # the lock's owner, created exclusively above (not a run output)
        finally:
            os.close(fd)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


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
