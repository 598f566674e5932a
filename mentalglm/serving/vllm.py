"""vLLM, started and configured by the project: its OpenAI-compatible server in a process of its own.

vLLM lives in its own environment (`make vllm`: .venv-vllm), because it pins an older transformers than the
project trains with; the server needs only the model and adapter directories. The base model is served under
its own name and the adapter (`--enable-lora --lora-modules`) under the run's model name; prompts go in as
token ids rendered by the project (so both backends see the same prompts), greedy, with GLM-4's stop ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from mentalglm.config import VLLMConfig
from mentalglm.errors import ConfigError
from mentalglm.network import free_port
from mentalglm.runtime.generation import (
    GREEDY,
    RowRequest,
    RowResult,
    Sampling,
    TokenLogprob,
    cut_at_stop_strings,
    stop_token_ids,
)

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
VLLM_ENV = "MENTALGLM_VLLM_PYTHON"
BASE_NAME = "base"  # the base model's name on the vLLM server (the adapter has the run's model name)


def vllm_python(cfg: VLLMConfig) -> str:
    """The Python whose environment has vLLM, else a ConfigError saying how to install it."""
    candidates = [cfg.python, os.environ.get(VLLM_ENV), str(ROOT / ".venv-vllm" / "bin" / "python"), sys.executable]
    for python in candidates:
        if python and Path(python).exists() and _has_vllm(python):
            return python
    raise ConfigError(
        "vLLM is not installed: `make vllm` installs it into .venv-vllm (or set generation.vllm.python "
        f"or ${VLLM_ENV}); or use generation.backend=hf"
    )


def _has_vllm(python: str) -> bool:
    try:
        return (
            subprocess.run(
                [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
                capture_output=True,
                timeout=60,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def _stop_with(parent: int) -> Callable[[], None]:
    """Run in the vLLM child before it starts: Linux sends it SIGTERM when the process that started it dies, even by
    SIGKILL (PR_SET_PDEATHSIG), so no engine outlives its parent holding the GPU's memory."""

    def arrange() -> None:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: the parent's __exit__ still stops it
            return
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return arrange


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` for a model directory and an optional adapter, on loopback.

    A context manager: the server is started (and waited for) on enter and stopped on exit; its output goes to
    `log_file`, which an error quotes when it does not come up.
    """

    def __init__(
        self,
        cfg: VLLMConfig,
        model_path: str,
        adapter: str | None,
        adapter_name: str,
        *,
        max_model_len: int,
        log_file: Path,
        dtype: str | None = None,
        more_adapters: dict[str, str] | None = None,
    ):
        self.cfg, self.model_path, self.adapter, self.adapter_name = cfg, model_path, adapter, adapter_name
        self.more_adapters = dict(more_adapters or {})  # name -> adapter dir, beside the first
        self.max_model_len, self.log_file, self.dtype = max_model_len, Path(log_file), dtype or cfg.dtype
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cfg = self.cfg
        cmd = [
            vllm_python(cfg),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_path,
            "--served-model-name",
            BASE_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--tensor-parallel-size",
            str(cfg.tensor_parallel_size),
            "--seed",
            "0",
            # Prompts are posts about suicide: never in vLLM's log either.
            "--no-enable-log-requests",
            "--disable-uvicorn-access-log",
        ]
        if not on_cpu():
            cmd += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
        if cfg.enforce_eager or (cfg.enforce_eager is None and on_cpu()):
            cmd.append("--enforce-eager")
        modules = ({self.adapter_name: self.adapter} if self.adapter else {}) | self.more_adapters
        if modules:
            cmd += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in modules.items())]
            cmd += ["--max-loras", str(len(modules)), "--max-lora-rank", str(cfg.max_lora_rank)]
        return cmd + list(cfg.extra_args)

    def __enter__(self) -> VLLMServer:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(self.cfg.cpu_kvcache_space_gb),
            "TOKENIZERS_PARALLELISM": "false",
        }
        env.pop("PYTHONPATH", None)  # vLLM's environment, not the project's
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            log.info("starting vLLM on 127.0.0.1:%d (log: %s)", self.port, self.log_file)
            self.process = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_stop_with(os.getpid()),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(
                    f"the vLLM server exited with code {self.process.returncode} while starting: "
                    f"{self._log_tail()} (full log: {self.log_file})"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    log.info("vLLM is ready")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise ConfigError(
            f"the vLLM server did not come up in {self.cfg.startup_timeout_s} s "
            f"(generation.vllm.startup_timeout_s); log: {self.log_file}"
        )

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log_file.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def __exit__(self, *exc) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


class VLLMClient:
    """Greedy completions of token-id prompts from a vLLM server, as the `hf` backend produces them."""

    def __init__(self, base_url: str, model: str, tokenizer, *, concurrency: int = 32, timeout_s: float = 600):
        from openai import AsyncOpenAI

        self.model, self.concurrency, self.base_url, self.tokenizer = model, concurrency, base_url, tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.client = AsyncOpenAI(
            base_url=base_url,
            api_key=os.environ.get("MENTALGLM_VLLM_API_KEY", "unused"),
            timeout=timeout_s,
            max_retries=2,
        )

    def _body(self, prompt: list[int], max_tokens: int, stop: list[str], sampling: Sampling = GREEDY) -> dict:
        body = dict(
            model=self.model,
            prompt=list(prompt),
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            stop=list(stop) or None,
            extra_body={"stop_token_ids": self.stop_ids, "skip_special_tokens": True, "return_token_ids": True},
        )
        if sampling != GREEDY:
            body |= dict(
                top_p=sampling.top_p,
                seed=sampling.seed,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
            )
            body["extra_body"] |= {"top_k": sampling.top_k if sampling.top_k > 0 else -1}
        return body

    def _final(self, ids: list[int], text: str, stop: list[str]) -> str:
        """The answer decoded from its token ids as the hf backend decodes it (vLLM's own text can drop a character
        cut in half at the token cap); its text where the server sends no ids."""
        if not ids:
            return text.strip()
        decoded = self.tokenizer.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)
        return cut_at_stop_strings(decoded, stop).strip()

    async def complete_capped(self, prompt: list[int], max_tokens: int, stop: list[str] = ()) -> tuple[str, bool]:
        """One greedy answer, stripped like the hf backend's, and whether the token cap cut it."""
        result = await self.complete_row(RowRequest(list(prompt), max_tokens, tuple(stop)))
        return result.text, result.finish_reason == "length"

    async def complete_row(self, row: RowRequest, model: str | None = None) -> RowResult:
        """A serving row's answer (its sampling, stop strings and cap) from `model` (the client's by default), with
        vLLM's token count and finish reason; `row.on_text` receives it piece by piece as it streams."""
        stop = list(row.stop_strings)
        body = self._body(row.prompt, row.max_new_tokens, stop, row.sampling) | ({"model": model} if model else {})
        if row.ignore_eos:
            body["extra_body"] |= {"ignore_eos": True}
        if row.logprobs is not None:
            body["logprobs"] = row.logprobs
        if row.on_text is None:
            response = await self.client.completions.create(**body)
            choice = response.choices[0]
            ids = list(getattr(choice, "token_ids", None) or [])
            text, reason = self._final(ids, choice.text, stop), choice.finish_reason
            tokens = self._count(ids, response.usage.completion_tokens if response.usage else 0)
            logprobs = None if row.logprobs is None else self._logprobs(choice.logprobs, row.logprobs, tokens)
            return RowResult(text, tokens, "length" if reason == "length" else "stop", logprobs)
        stream, ids, reason = StreamText(row.on_text), [], None
        async for chunk in await self.client.completions.create(**body, stream=True):
            if chunk.choices:
                stream.add(chunk.choices[0].text or "")
                ids += list(getattr(chunk.choices[0], "token_ids", None) or [])
                reason = chunk.choices[0].finish_reason or reason
        text = stream.finish(self._final(ids, stream.text, stop))
        return RowResult(text, self._count(ids, 0), "length" if reason == "length" else "stop")

    @staticmethod
    def _logprobs(found, alternatives: int, tokens: int) -> tuple[TokenLogprob, ...]:
        """vLLM's legacy-shaped logprobs as the hf backend's, for the first `tokens` tokens (the end token not)."""
        if found is None:
            return ()
        tops = found.top_logprobs or [None] * len(found.tokens)
        out = []
        for token, logprob, top in list(zip(found.tokens, found.token_logprobs, tops))[:tokens]:
            ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])[:alternatives]
            out.append(TokenLogprob(token, float(logprob), tuple(ranked)))
        return tuple(out)

    def _count(self, ids: list[int], reported: int) -> int:
        """Tokens generated, the end token not counted (as the hf backend counts)."""
        return len([t for t in ids if t not in self.stop_ids]) if ids else reported

    async def _complete_all(self, prompts, max_tokens, stop, progress=None) -> list[tuple[str, bool]]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(p):
            async with gate:
                text = await self.complete_capped(p, max_tokens, stop)
            if progress is not None:
                progress(1)
            return text

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await self.client.close()

    def complete_all(
        self, prompts: list[list[int]], max_tokens: int, stop: list[str] = (), progress=None
    ) -> list[tuple[str, bool]]:
        """Every prompt's (answer, cut by the cap), in order, `concurrency` requests at a time (vLLM batches)."""
        return asyncio.run(self._complete_all(prompts, max_tokens, stop, progress))


class StreamText:
    """Streamed pieces normalised like a final answer: leading whitespace dropped, trailing whitespace held
    until more text follows, so the pieces add up to the stripped answer."""

    def __init__(self, on_text: Callable[[str], None]):
        self.on_text, self.text, self.sent = on_text, "", ""

    def add(self, piece: str) -> None:
        self.text += piece
        ready = self.text.strip()
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            self.on_text(ready[len(self.sent) :])
            self.sent = ready

    def finish(self, final: str | None = None) -> str:
        final = self.text.strip() if final is None else final
        if final != self.sent and final.startswith(self.sent):
            self.on_text(final[len(self.sent) :])
        self.sent = final
        return final


@contextlib.contextmanager
def vllm_generator(
    vllm: VLLMConfig, model_path: str, tokenizer, *, adapter: str | None, max_model_len: int, log_file: Path
) -> Iterator[Callable[..., list[str]]]:
    """`generate(prompts, max_tokens, stop=(), progress=None)`: greedy (answer, cut by the cap) pairs from vLLM,
    the server at `vllm.base_url` or one started here for the duration of the block."""
    model = vllm.model if adapter else BASE_NAME

    def make(base_url: str):
        def generate(prompts, max_tokens: int, stop=(), progress=None) -> list[tuple[str, bool]]:
            client = VLLMClient(base_url, model, tokenizer, concurrency=vllm.concurrency)
            return client.complete_all([list(p) for p in prompts], max_tokens, list(stop), progress)

        return generate

    if vllm.base_url:
        yield make(vllm.base_url)
        return
    with VLLMServer(
        vllm, model_path, adapter, vllm.model, max_model_len=vllm.max_model_len or max_model_len, log_file=log_file
    ) as server:
        yield make(server.base_url)
