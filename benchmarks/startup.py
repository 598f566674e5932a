"""Start-up: the time from `python train.py` to the first training step on the tiny model, and where it goes.

    python benchmarks/startup.py              # 3 runs of the demo's stage two, one epoch, no test

Each run is a fresh `train.py experiment=demo variant=s2` process (outputs in a temporary folder, the tokenizer,
checkpoint and tokenized datasets cached after the first run, as for a user's second run). The module logs
"first training step N s after the process started"; the script prints those figures and the import time of
the entry point's modules (`python -X importtime`), the largest first.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "experiment=demo",
    "variant=s2",
    "stages.two.max_epochs=1",
    "test=false",
    "logger=csv",
    "data.limit_eval=2",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
]


def first_step_seconds(out: Path, cache: Path) -> float:
    cmd = [sys.executable, str(ROOT / "train.py"), *RUN, f"paths.output_root={out}", f"paths.cache_dir={cache}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    found = re.search(r"first training step ([\d.]+) s after the process started", proc.stdout + proc.stderr)
    if not found:
        sys.exit("train.py did not log its first training step")
    return float(found.group(1))


def import_times(module: str, top: int) -> list[tuple[str, float]]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=True
    )
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 3:  # the entry point's module and its direct imports
            rows.append((m.group(3), int(m.group(1)) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        seconds = [first_step_seconds(Path(tmp) / f"out{i}", cache) for i in range(args.runs)]
    print(f"machine: {C.machine()}")
    print(
        C.table(
            [("first run (cold cache)", f"{seconds[0]:.1f}"), ("later runs (median)", f"{C.median(seconds[1:]):.1f}")],
            ("python train.py -> first training step", "seconds"),
        )
    )
    print(C.table(import_times("mentalglm.commands.train", 8), ("import (cumulative)", "seconds")))


if __name__ == "__main__":
    main()
