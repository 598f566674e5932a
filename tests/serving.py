"""Helpers of the serving tests: a LoRA adapter on the tiny GLM and serve.py started as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import ROOT, cli_env

from mentalglm.network import free_port

MODEL = ["model=tiny_glm", "data=fixtures"]


def make_adapter(cache: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter with random (non-zero) weights on the tiny GLM of conf/model/tiny_glm.yaml."""
    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model

    from mentalglm.models.loading import load_base_model

    if (out / "adapter_model.safetensors").is_file():
        return out
    base = load_base_model(OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_glm.yaml")), cache)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    model.save_pretrained(out)
    return out


class ServerProcess:
    """An entry point serving HTTP in a subprocess, `args(port)` its overrides; `url` once /ready answers. Output
    (stdout + stderr) goes to `log`, run outputs under `outputs`."""

    def __init__(self, script: str, args, tmp: Path, env: dict | None = None, timeout: float = 600):
        self.port = free_port()
        self.log = tmp / f"{Path(script).stem}-{self.port}.log"
        self.outputs = tmp / f"outputs-{self.port}"
        cmd = [sys.executable, str(ROOT / script), *args(self.port)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**cli_env(self.outputs), **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{script} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{script} did not become ready:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


class Server(ServerProcess):
    """serve.py on the tiny GLM (with `adapter`, if given)."""

    def __init__(
        self,
        tmp: Path,
        cache: Path,
        adapter: Path | None,
        *overrides: str,
        env: dict | None = None,
        timeout: float = 600,
    ):
        def args(port: int) -> list[str]:
            adapter_arg = [f"adapter={adapter}"] if adapter else []
            return [f"paths.cache_dir={cache}", *MODEL, f"serve.port={port}", *adapter_arg, *overrides]

        super().__init__("serve.py", args, tmp, env=env, timeout=timeout)


def train_adapter(tmp: Path, cache: Path, *overrides: str) -> Path:
    """A briefly trained adapter of the demo (stage two on the label-only fixtures): confident answers, so greedy
    decoding does not hang on near-ties between the logits of different engines (three epochs of the explained
    fixtures leave a CP answer on such a tie: vLLM and hf part ways after 20 tokens)."""
    from conftest import FAST_DEMO

    out = tmp / "outputs"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"paths.cache_dir={cache}",
        *FAST_DEMO,
        "variant=s2",
        "test=false",
        "stages.two.max_epochs=3",
        "data=fixtures_label_only",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(out), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{proc.stderr[-3000:]}")
    (run,) = sorted((out / "train").glob("*/runs/*"))
    import json

    return Path(json.loads((run / "summary.json").read_text())["best_adapter"])


class TeacherServer:
    """tests/teacher_server.py (a scripted OpenAI-compatible teacher) in a subprocess; `requests()` reads what it
    received: (prompt hash, time) per request."""

    def __init__(self, tmp: Path, faults: str = "", delay_s: float = 0.0):
        self.port = free_port()
        self.request_log = tmp / f"teacher-{self.port}.requests"
        self.request_log.touch()
        self.log = tmp / f"teacher-{self.port}.log"
        cmd = [sys.executable, str(ROOT / "tests/teacher_server.py"), str(self.port), str(self.request_log), faults]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([*cmd, str(delay_s)], stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"teacher server did not start:\n{self.log.read_text()[-2000:]}")

    def requests(self) -> list[tuple[str, float]]:
        lines = self.request_log.read_text().split()
        return [(lines[i], float(lines[i + 1])) for i in range(0, len(lines), 2)]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
