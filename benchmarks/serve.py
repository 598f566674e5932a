"""Serving throughput and latency: serve.py as a real process on 127.0.0.1, /v1/completions under load.

    python benchmarks/serve.py                     # hf backend with and without dynamic batching (+ vLLM if installed)
    python benchmarks/serve.py --requests 96 --max-tokens 32

For each server (hf with serve.max_batch_size=16, hf with serve.max_batch_size=1, i.e. no dynamic batching, and
vLLM where `make vllm` installed it) and each concurrency (1, 8, 32 clients), --requests greedy completions of
--max-tokens tokens are sent from a thread pool over HTTP; requests/s and p50/p95 latency are reported, and the
ratio of batched to unbatched requests/s at each concurrency. The model is the tiny GLM (conf/model/tiny_glm.yaml)
with a random LoRA adapter; every answer is checked to be the same across servers (greedy), so the servers do
the same work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.ROOT / "tests"))

PROMPTS = [
    f"帖子{i}：最近压力很大，晚上睡不着，觉得很累。" if i % 2 else f"Post {i}: I feel alone and tired lately."
    for i in range(64)
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=C.default_cache_dir())
    return p.parse_args(argv)


def load(url: str, n: int, concurrency: int, max_tokens: int) -> tuple[float, list[float], list[str]]:
    import httpx

    def one(i: int) -> tuple[float, str]:
        t0 = time.perf_counter()
        r = httpx.post(
            url + "/v1/completions",
            timeout=600,
            json={"model": "mentalglm", "prompt": PROMPTS[i % 64], "max_tokens": max_tokens, "temperature": 0},
        )
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["choices"][0]["text"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    return time.perf_counter() - start, [r[0] for r in results], [r[1] for r in results]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv=None) -> None:
    from serving import Server, make_adapter

    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="mentalglm-serve-bench-"))
    adapter = make_adapter(args.cache_dir, tmp / "adapter")
    servers = {
        "hf, dynamic batching (16)": ["serve.max_batch_size=16", "serve.max_wait_ms=10"],
        "hf, no batching (1)": ["serve.max_batch_size=1"],
    }
    if not args.skip_vllm:
        from mentalglm.config import VLLMConfig
        from mentalglm.errors import ConfigError
        from mentalglm.serving.vllm import vllm_python

        try:
            vllm_python(VLLMConfig())
            servers["vllm"] = ["serve.backend=vllm"]
        except ConfigError as e:
            print(f"vLLM left out: {e}")
    common = ["serve.queue_size=256", f"serve.max_tokens={args.max_tokens}"]
    print(f"machine: {C.machine()}")
    print(f"{args.requests} requests per level, {args.max_tokens} new tokens each, tiny GLM + random LoRA\n")
    rows, answers = {}, {}
    for name, overrides in servers.items():
        srv = Server(tmp, args.cache_dir, adapter, *common, *overrides)
        try:
            load(srv.url, 4, 2, args.max_tokens)  # warm-up
            for c in levels:
                seconds, latencies, texts = load(srv.url, args.requests, c, args.max_tokens)
                rows[(name, c)] = (args.requests / seconds, pct(latencies, 50), pct(latencies, 95))
                answers[(name, c)] = texts
                print(f"  {name:28s} concurrency {c:3d}: {args.requests / seconds:6.2f} req/s", file=sys.stderr)
        finally:
            srv.stop()
    print("| server | concurrency | requests/s | p50 latency s | p95 latency s |")
    print("|---|---:|---:|---:|---:|")
    for (name, c), (rps, p50, p95) in rows.items():
        print(f"| {name} | {c} | {rps:.2f} | {p50:.2f} | {p95:.2f} |")
    print("\n| concurrency | batched / unbatched requests/s |")
    print("|---:|---:|")
    for c in levels:
        print(f"| {c} | {rows[('hf, dynamic batching (16)', c)][0] / rows[('hf, no batching (1)', c)][0]:.2f}x |")
    hf = answers[("hf, no batching (1)", levels[0])]
    same = {k: sum(a == b for a, b in zip(v, hf)) for k, v in answers.items()}
    print(f"\nanswers equal to the unbatched hf server's: {same} (of {args.requests})")


if __name__ == "__main__":
    main()
