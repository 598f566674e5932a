"""What serve.py runs: the model (+ adapter) behind the OpenAI-compatible app, on the hf or the vLLM backend."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mentalglm.config import ServeSettings, as_config
from mentalglm.errors import ConfigError
from mentalglm.network import is_loopback_host
from mentalglm.runtime.builders import build_predictor, build_tasks, resolve_adapter, selected_tasks
from mentalglm.tracking import check_env_name

log = logging.getLogger(__name__)
BACKENDS = ("hf", "vllm")


def api_key(settings: ServeSettings) -> str | None:
    """The key clients must send; required (from the environment) whenever the server listens beyond loopback."""
    check_env_name("serve.api_key_env", settings.api_key_env)
    key = os.environ.get(settings.api_key_env) or None
    if key is None and not is_loopback_host(settings.host):
        raise ConfigError(
            f"serve.host={settings.host} is reachable beyond this machine: set an API key in the "
            f"environment ({settings.api_key_env}=...); clients send it as Authorization: Bearer <key>"
        )
    return key


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so the `with` blocks around the server (the vLLM engine) close."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def serve(cfg: DictConfig) -> None:
    # uvicorn finishes the requests in flight on SIGTERM and then raises the signal again: with the default handler
    # the process would end there, leaving the vLLM engine it started running. Here it unwinds, then ends as SIGTERM.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _serve(cfg)
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(cfg: DictConfig) -> None:
    import uvicorn

    from mentalglm.serving.app import create_app
    from mentalglm.serving.backends import HFBackend, VLLMBackend
    from mentalglm.serving.predictor import NOTICE

    settings = as_config(ServeSettings, OmegaConf.to_container(cfg.serve, resolve=True))
    if settings.backend not in BACKENDS:
        raise ConfigError(f"serve.backend={settings.backend} is not one of {', '.join(BACKENDS)}")
    key = api_key(settings)
    tasks = build_tasks(cfg)
    tasks = {n: tasks[n] for n in selected_tasks(cfg, tasks)}
    adapter = resolve_adapter(cfg)
    predictor = build_predictor(cfg, tasks, adapter, load=settings.backend == "hf")
    model_cfg, data, generation = predictor.model_cfg, predictor.data, predictor.generation
    log.info("%s", NOTICE)

    def run(app) -> None:
        # Our middleware logs each request (never its body); uvicorn's access log would repeat it.
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(settings.timeout_s),
        )

    if settings.backend == "hf":
        run(create_app(HFBackend(predictor, settings), settings, api_key=key))
        return
    from mentalglm.models.loading import resolve_pretrained
    from mentalglm.serving.vllm import BASE_NAME, VLLMClient, VLLMServer

    vllm = generation.vllm
    with VLLMServer(
        vllm,
        resolve_pretrained(model_cfg, cfg.paths.cache_dir),
        adapter,
        settings.model_name,
        max_model_len=vllm.max_model_len or data.max_length + settings.max_tokens,
        log_file=Path(cfg.output_dir) / "vllm.log",
    ) as server:
        client = VLLMClient(
            server.base_url,
            settings.model_name if adapter else BASE_NAME,
            predictor.tokenizer,
            timeout_s=settings.timeout_s,
        )
        run(create_app(VLLMBackend(predictor, client, settings), settings, api_key=key))
