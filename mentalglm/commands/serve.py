"""What serve.py runs: the model (+ adapter) behind the OpenAI-compatible app, on the hf or the vLLM backend."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

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
    from mentalglm.serving.backends import PRIMARY, HFBackend, ServedModel, VLLMBackend
    from mentalglm.serving.predictor import NOTICE

    settings = as_config(ServeSettings, OmegaConf.to_container(cfg.serve, resolve=True))
    if settings.backend not in BACKENDS:
        raise ConfigError(f"serve.backend={settings.backend} is not one of {', '.join(BACKENDS)}")
    key = api_key(settings)
    adapter = resolve_adapter(cfg)
    more = more_adapters(cfg, settings, adapter)  # checked before the model loads
    predictor = build_predictor(cfg, served_tasks(cfg), adapter, load=settings.backend == "hf")
    model_cfg, data, generation = predictor.model_cfg, predictor.data, predictor.generation
    models = {settings.model_name: ServedModel(predictor, PRIMARY if adapter else None)}
    for name, (path, extra_cfg) in more.items():
        extra = build_predictor(extra_cfg, served_tasks(extra_cfg), path, load=False)
        models[name] = ServedModel(extra, name)
        if predictor.model is not None:
            predictor.model.load_adapter(path, adapter_name=name)
    if settings.base_model_name:
        if settings.base_model_name in models:
            raise ConfigError(f"serve.base_model_name={settings.base_model_name} is already a served model's id")
        models[settings.base_model_name] = ServedModel(predictor, None)
    log.info("serving %s", ", ".join(models))
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
        run(create_app(HFBackend(predictor, settings), settings, api_key=key, models=models))
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
        more_adapters={name: path for name, (path, _) in more.items()},
    ) as server:
        client = VLLMClient(
            server.base_url,
            settings.model_name if adapter else BASE_NAME,
            predictor.tokenizer,
            timeout_s=settings.timeout_s,
        )
        run(create_app(VLLMBackend(predictor, client, settings), settings, api_key=key, models=models))


def served_tasks(cfg: DictConfig) -> dict:
    tasks = build_tasks(cfg)
    return {n: tasks[n] for n in selected_tasks(cfg, tasks)}


# Settings of the base model an adapter is trained on: every adapter of one server must share them.
BASE_KEYS = ("name", "pretrained", "chat", "base_template", "system", "tiny", "quantization")


def more_adapters(cfg: DictConfig, settings: ServeSettings, first: str | None) -> dict[str, tuple[str, DictConfig]]:
    """serve.adapters as {id: (adapter dir, the config its run restores)}, each checked to share this base."""
    import copy

    from mentalglm.runtime.run_card import restore_run

    adapters = settings.adapters or {}
    if not isinstance(adapters, dict) or not all(isinstance(v, str) for v in adapters.values()):
        raise ConfigError(f"serve.adapters={adapters!r}: give {{id: adapter or run directory, ...}}")
    if adapters and first is None:
        raise ConfigError("serve.adapters: name the first adapter with adapter= or run_dir= (it sets the base)")
    if adapters and cfg.scores.enabled:
        raise ConfigError("serve.adapters: scores.enabled serves one adapter; start a server per adapter for scores")
    out = {}
    for name, path in adapters.items():
        where = f"serve.adapters.{name}"
        if name == settings.model_name:
            raise ConfigError(f"{where}: {name!r} is already serve.model_name, the first adapter's id")
        if not path or not Path(path).is_dir():
            raise ConfigError(f"{where}={path}: not a directory (an adapter or a train.py run directory)")
        is_adapter = (Path(path) / "adapter_config.json").is_file()
        extra = copy.deepcopy(cfg)
        with open_dict(extra):
            extra.adapter, extra.run_dir = (path, None) if is_adapter else (None, path)
        adapter = resolve_adapter(extra)
        restore_run(extra, adapter)
        for key in BASE_KEYS:
            mine, theirs = cfg.model.get(key), extra.model.get(key)
            if mine != theirs:
                raise ConfigError(
                    f"{where}: its adapter was trained on model.{key}={theirs!r}, this server's base has {mine!r}; "
                    "one server serves adapters of one base model"
                )
        out[name] = (adapter, extra)
    return out
