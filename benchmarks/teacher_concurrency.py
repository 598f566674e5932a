"""Teacher throughput: build_data.py explain at concurrency 1 vs 16 against a loopback OpenAI-compatible server.

    python benchmarks/teacher_concurrency.py                 # 250 SOS-HL-1K test posts (fixtures without ../shared)
    python benchmarks/teacher_concurrency.py --latency 0.5   # a slower API

The server is tests/teacher_server.py, answering every request after `--latency` seconds (what a remote API costs
per request, beside its generation time): the benchmark measures the client (bounded concurrency, retries, cache
writes), not a model. Each setting is a fresh build_data.py process with its own empty cache, run in turn
(1, 16, 1, 16); items/s comes from the ask phase the run reports (`seconds` in build_report.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C

ROOT = C.ROOT
sys.path.insert(0, str(ROOT / "tests"))


def run(url: str, tmp: Path, concurrency: int, n: int, data: list[str]) -> float:
    out = tmp / f"out-{concurrency}-{n}"
    cmd = [
        sys.executable,
        str(ROOT / "build_data.py"),
        *data,
        "expert_examples=fixtures",
        "data.select=[sos_hl_1k]",
        "splits=[test]",
        f"teacher.base_url={url}",
        "teacher.model=teacher",
        f"teacher.concurrency={concurrency}",
        f"cache={tmp / f'cache-{concurrency}-{n}.jsonl'}",
        f"output={out}",
        f"hydra.run.dir={out}",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    report = json.loads((out / "build_report.json").read_text())
    items = sum(v["items"] for v in report["tasks"].values())
    assert report["requests"]["asked"] == items
    return items / report["seconds"], items


def main() -> None:
    from serving import TeacherServer

    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    data = ["data=shared"] if C.shared_data_dir() else ["data=fixtures"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = TeacherServer(tmp, delay_s=args.latency)
        try:
            rates: dict[int, list[float]] = {1: [], 16: []}
            for n in range(args.repeats):
                for concurrency in (1, 16):
                    rate, items = run(server.url, tmp, concurrency, n, data)
                    rates[concurrency].append(rate)
        finally:
            server.stop()
    print(f"{data[0]}, {items} items, server latency {args.latency} s per request")
    print("| concurrency | items/s (each run) | median |")
    print("|---:|---|---:|")
    med = {c: sorted(r)[len(r) // 2] for c, r in rates.items()}
    for c, r in rates.items():
        print(f"| {c} | {', '.join(f'{x:.2f}' for x in r)} | {med[c]:.2f} |")
    print(f"ratio 16 / 1: {med[16] / med[1]:.1f}x")


if __name__ == "__main__":
    main()
