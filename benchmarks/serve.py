"""Serving throughput and latency: serve.py as a real process on 127.0.0.1, /v1/completions under load.

    python benchmarks/serve.py                     # hf backend with and without dynamic batching (+ vLLM if installed)
    python benchmarks/serve.py --requests 96 --max-tokens 32

For each server (hf with serve.max_batch_size=16, hf with serve.max_batch_size=1, i.e. no dynamic batching, and
vLLM where `make vllm` installed it) and each concurrency (1, 8, 32 clients), --requests greedy completions of
--max-tokens tokens are sent from a thread pool over HTTP; requests/s and p50/p95 latency are reported, and the
ratio of batched to unbatched requests/s at each concurrency. The model is the tiny GLM (conf/model/tiny_glm.yaml)
with a random LoRA adapter; every answer is checked to be the same across servers (greedy), so the servers do
the same work.

Then the request mixes of real clients, on the batching hf server with a second adapter beside the first, each at
--mix-concurrency clients against plain greedy requests measured in the same run: sampled requests (temperature
0.8, a seed each), n=4 (four choices per request: choices/s), two adapters interleaved, and a disconnect storm
(100 streaming clients that read one event and leave; greedy requests/s after it against before).
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
    p.add_argument("--mix-concurrency", type=int, default=16)
    p.add_argument("--only-mixes", action="store_true", help="skip the batching comparison")
    p.add_argument("--cache-dir", type=Path, default=C.default_cache_dir())
    return p.parse_args(argv)


def load(
    url: str, n: int, concurrency: int, max_tokens: int, fields=lambda i: {}
) -> tuple[float, list[float], list[str]]:
    """n completions from `concurrency` clients: (seconds, latencies, first choices); `fields(i)` adds to request i."""
    import httpx

    def one(i: int) -> tuple[float, str]:
        t0 = time.perf_counter()
        body = {"model": "mentalglm", "prompt": PROMPTS[i % 64], "max_tokens": max_tokens, "temperature": 0}
        r = httpx.post(url + "/v1/completions", timeout=600, json=body | fields(i))
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["choices"][0]["text"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    return time.perf_counter() - start, [r[0] for r in results], [r[1] for r in results]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def storm(url: str, clients: int, max_tokens: int) -> int:
    """`clients` streaming requests, each reading its first event and leaving; how many got a stream."""
    import httpx

    def leave(i: int) -> bool:
        body = {"model": "mentalglm", "prompt": PROMPTS[i % 64], "max_tokens": max_tokens, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return False
            next(r.iter_lines())
            return True

    with ThreadPoolExecutor(32) as pool:
        return sum(pool.map(leave, range(clients)))


def mixes(args, tmp: Path, adapter: Path) -> None:
    from serving import Server, make_adapter

    second = make_adapter(args.cache_dir, tmp / "second", seed=1)
    srv = Server(
        tmp,
        args.cache_dir,
        adapter,
        "serve.max_batch_size=16",
        "serve.queue_size=256",
        f"serve.max_tokens={args.max_tokens}",
        f"serve.adapters={{second:'{second}'}}",
    )
    n, c, tokens = args.requests, args.mix_concurrency, args.max_tokens
    try:
        load(srv.url, 8, 4, tokens)  # warm-up
        greedy = n / load(srv.url, n, c, tokens)[0]
        sampled = n / load(srv.url, n, c, tokens, lambda i: {"temperature": 0.8, "seed": i})[0]
        four = 4 * n / load(srv.url, n, c, tokens, lambda i: {"n": 4, "temperature": 0.8, "seed": i})[0]
        two = n / load(srv.url, n, c, tokens, lambda i: {"model": ("mentalglm", "second")[i % 2]})[0]
        before = n / load(srv.url, n, c, tokens)[0]
        streams = storm(srv.url, 100, tokens)
        after = n / load(srv.url, n, c, tokens)[0]
    finally:
        srv.stop()
    print(f"\nrequest mixes: {n} requests of {tokens} new tokens at concurrency {c}, batching hf server (16)\n")
    print("| mix | answers/s | vs greedy |")
    print("|---|---:|---:|")
    for name, rate in (
        ("greedy (reference)", greedy),
        ("sampled (temperature 0.8, seeded)", sampled),
        ("n=4 (choices/s)", four),
        ("two adapters interleaved", two),
    ):
        print(f"| {name} | {rate:.2f} | {rate / greedy:.2f}x |")
    print(f"\ndisconnect storm: {streams} of 100 streaming clients left after one event;")
    print(f"greedy requests/s before {before:.2f}, after {after:.2f}: after / before = {after / before:.2f}x")


def main(argv=None) -> None:
    from serving import make_adapter

    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="mentalglm-serve-bench-"))
    adapter = make_adapter(args.cache_dir, tmp / "adapter")
    print(f"machine: {C.machine()}")
    if not args.only_mixes:
        batching(args, tmp, adapter, levels)
    mixes(args, tmp, adapter)


def batching(args, tmp: Path, adapter: Path, levels: list[int]) -> None:
    from serving import Server

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
