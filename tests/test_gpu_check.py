"""benchmarks/gpu_check.py: the CPU dry run of every step, the per-step caps and partial reports, the wheels."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import ROOT, cli_env

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

# What the device image lacks and the check does not carry: importing one of these would fail there.
BLOCK = """
import runpy, sys
MISSING = {"hydra", "wandb", "datasets", "fastapi", "openai"}
class Hide:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_dry_run_goes_through_every_step_with_what_the_device_has(tmp_path, cli_cache):
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", BLOCK, "benchmarks/gpu_check.py", "--tiny", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--cache-dir", str(cli_cache)], cwd=ROOT, env=cli_env(tmp_path), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["steps"]) == list(gpu_check.STEPS)
    assert all(step["status"] == "ok" for step in report["steps"].values()), report["steps"]
    steps = report["steps"]
    for name in ("lora_bf16", "lora_bf16_chunked", "qlora_4bit"):
        assert steps[name]["tokens_per_s"] > 0 and steps[name]["timed_steps"] == 2
    assert steps["lora_bf16_chunked"]["loss_chunk_size"] == 16 and steps["qlora_4bit"]["q_proj"] == "Linear4bit"
    assert steps["generation"]["items"] == 8 and steps["generation"]["speedup"] > 0
    assert steps["likelihood"]["rows"] == 8 and steps["likelihood"]["speedup"] > 0
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {name} | ok |" in table for name in list(gpu_check.STEPS)[1:])
    assert table in proc.stdout


def test_a_step_over_its_cap_or_failing_costs_only_itself(tmp_path):
    args = gpu_check.parse_args(["--tiny", "--out", str(tmp_path), "--cap-scale", "0.001"])
    check = gpu_check.Check(args)
    check.run("environment", lambda: {"device": "test"})
    check.run("model", lambda: time.sleep(5))  # cap: 45 s x 0.001 x 20 (dry run) = 0.9 s

    def broken():
        raise RuntimeError("CUDA error: out of memory\nmore")

    check.run("lora_bf16", broken)
    report = json.loads((tmp_path / "gpu_check.json").read_text())  # written after every step
    assert report["steps"]["environment"]["device"] == "test"
    assert report["steps"]["model"]["status"].startswith("timed out: over its cap of 1 s")
    assert report["steps"]["model"]["seconds"] < 4
    assert report["steps"]["lora_bf16"]["status"] == "failed: RuntimeError: CUDA error: out of memory"
    assert "| lora_bf16 | failed: RuntimeError" in (tmp_path / "gpu_check.md").read_text()


def test_the_wheels_travel_within_the_device_limit(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check_wheels.py", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = {p.name.split("-")[0] for p in tmp_path.glob("*.whl")}
    assert wheels == {"omegaconf", "antlr4_python3_runtime", "bitsandbytes"}
    total = proc.stdout.strip().splitlines()[-1]
    assert total.startswith("total: ") and total.endswith(" of 64 MiB")
    assert float(total.split()[1]) <= 64


def test_the_wheel_list_pins_what_the_tests_ran():
    import importlib.metadata as md

    import gpu_check_wheels

    for requirement in gpu_check_wheels.requirements():
        name, version = requirement.split("==")
        assert md.version(name) == version, f"{requirement}: this machine has {md.version(name)}"
