"""Weights & Biases: offline unless a key is set, one group per sweep, one run per stage, secrets masked."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Config keys whose values are credentials (matched as parts of the key, case-insensitively).
# A key names a credential when its last word does (hf_token, openai_api_key, client_secret): max_new_tokens and
# pad_token are settings, not credentials.
SECRET_KEY_WORDS = (
    "token",
    "apikey",
    "secret",
    "secrets",
    "password",
    "passwd",
    "credential",
    "credentials",
    "auth",
    "key",  # openai_key, wandb_key: a key names a credential unless it is one of the settings below
    "keys",
)
SECRET_KEY_PAIRS = ("api_key", "access_key", "private_key", "secret_key", "auth_key")
NOT_SECRET_KEYS = (
    "pad_token",
    "eos_token",
    "bos_token",
    "unk_token",
    "sep_token",
    "cls_token",
    "mask_token",
    "key",  # expert_eval's key file (key.csv): a path
    "keys",
    "secret_keys",  # the names of more secret keys, not secrets
    "sort_key",
    "metric_key",
    "metric_keys",
    "monitor_key",
    "cache_key",
)
# Values shaped like common API keys are secrets whatever their key is called (OpenAI/DeepSeek `sk-...`, Hugging
# Face `hf_...`); 40 hex digits (a W&B key) only under a key naming a key or W&B (a commit hash is not a secret).
KEY_SHAPE = re.compile(r"(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,})")
HEX40 = re.compile(r"[0-9a-f]{40}")


def looks_like_a_key(value: str, key: str = "") -> bool:
    value = value.strip().strip("'\"")
    if KEY_SHAPE.fullmatch(value):
        return True
    return bool(HEX40.fullmatch(value)) and any(w in key.lower() for w in ("key", "wandb", "token"))


MASK = "***"


def wandb_offline() -> bool:
    """Offline unless WANDB_MODE=online, or a WANDB_API_KEY is set and WANDB_MODE does not say offline."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    return mode != "online" and not os.environ.get("WANDB_API_KEY")


def sweep_group(experiment_name: str, sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's runs: its experiment and its own directory, so two sweeps never mix."""
    return f"{experiment_name}-{Path(sweep_dir).name}"


def wandb_group(experiment_name: str) -> str:
    """The W&B group of a job: per sweep under `-m`, the experiment otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return sweep_group(experiment_name, hc.sweep.dir)
    return str(experiment_name)


def finish_loggers(loggers: list) -> None:
    """One W&B run per stage: finish it even on failure so the next job's run never merges into it."""
    for lg in loggers:
        if lg.__class__.__name__ == "WandbLogger":
            try:
                import wandb

                wandb.finish()
            except Exception as e:  # a logging failure must not hide the training error
                log.warning("wandb.finish failed: %s", e)


def environment_secrets() -> frozenset[str]:
    """Values of credential-like environment variables (at least 8 characters): masked wherever they appear."""
    return frozenset(
        v
        for k, v in os.environ.items()
        if len(v) >= 8 and any(p in k.lower() for p in ("key", "token", "secret", "password"))
    )


def is_secret_key(key: Any, extra: frozenset[str] = frozenset()) -> bool:
    name = str(key).lower()
    if name in extra:
        return True
    words = re.split(r"[^a-z0-9]+", name)
    if "_".join(words[-2:]) in SECRET_KEY_PAIRS:
        return True
    return words[-1] in SECRET_KEY_WORDS and name not in NOT_SECRET_KEYS


def redact_secrets(obj, secrets: frozenset[str] | None = None, extra_keys: frozenset[str] = frozenset()):
    """`obj` (plain config data) with credential-like values masked: values of keys that look like credentials
    (or are listed in `extra_keys`), and any string holding a secret of the environment."""
    if secrets is None:
        secrets = environment_secrets()
    if isinstance(obj, dict):
        return {
            k: MASK if is_secret_key(k, extra_keys) and v not in (None, "") else redact_secrets(v, secrets, extra_keys)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v, secrets, extra_keys) for v in obj]
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return MASK
    return obj


def ablation_table(lines: list[dict], columns: list[tuple[str, str]]):
    import wandb

    cols = ["model", "variant", "seeds", "failed"] + [f"{name} {s}" for _, name in columns for s in ("mean", "std")]
    table = wandb.Table(columns=cols)
    for ln in lines:
        values = []
        for key, _ in columns:
            mean, std = ln[key] if ln[key] is not None else (None, None)
            values += [None if mean is None else round(mean, 2), None if std is None else round(std, 2)]
        table.add_data(ln["model"], ln["variant"], len(ln["seeds"]), len(ln["failed"]), *values)
    return table


def log_ablation(config, summary: dict, sweep_dir: Path, default_project: str = "mentalglm") -> None:
    """The sweep's ablation table as its own W&B run in the sweep's group (the table on disk is what matters)."""
    try:
        import wandb

        wcfg = config.logger.wandb or {}
        run = wandb.init(
            project=wcfg.get("project") or default_project,
            entity=wcfg.get("entity"),
            group=sweep_group(config.experiment_name, sweep_dir),
            job_type="ablation",
            name=f"ablation-{sweep_dir.name}",
            dir=str(sweep_dir),
            mode="offline" if wandb_offline() else "online",
            reinit="finish_previous",
        )
        run.log({"ablation": ablation_table(summary["lines"], summary["columns"])})
        run.finish()
    except Exception as e:
        log.warning("could not log the ablation table to W&B: %s", e)


def config_secrets(cfg) -> frozenset[str]:
    """Values of the config's credential-like keys (and of the keys named in `secret_keys`), plus the
    environment's secrets: what no file a run writes may hold."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=False) if not isinstance(cfg, dict) else cfg
    extra = frozenset(str(k).lower() for k in (data.get("secret_keys") or []))
    found: set[str] = set(environment_secrets())

    def walk(node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if is_secret_key(k, extra) and isinstance(v, (str, int, float)) and str(v) not in ("", "None"):
                    found.add(str(v))
                elif is_secret_key(k, extra) and isinstance(v, list):  # api_keys=[...]
                    found.update(str(x) for x in v if isinstance(x, (str, int)) and str(x))
                elif isinstance(v, str) and looks_like_a_key(v, str(k)):  # a key pasted under any name
                    found.add(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                if isinstance(v, str) and looks_like_a_key(v):
                    found.add(v)
                walk(v)

    walk(data)
    return frozenset(s for s in found if len(s) >= 4)


def loggable_config(cfg) -> dict:
    """The resolved config as a tracker may store it: credential-like keys, the keys named in `secret_keys`
    and any value holding a known secret masked."""
    from omegaconf import OmegaConf

    extra = frozenset(str(k).lower() for k in (cfg.get("secret_keys") or []))
    return redact_secrets(OmegaConf.to_container(cfg, resolve=True), config_secrets(cfg), extra)


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_env_name(key: str, name: str | None) -> None:
    """A `*_env` setting names an environment variable; a key pasted there instead is refused without echoing it."""
    from mentalglm.errors import ConfigError

    if name and (looks_like_a_key(name) or not ENV_NAME.fullmatch(name)):
        raise ConfigError(
            f"{key}={MASK}: not the name of an environment variable (it looks like a key itself); put the key in "
            f"an environment variable, e.g. export MY_KEY=..., and give {key}=MY_KEY"
        )


def command_line_secrets(argv) -> frozenset[str]:
    """The secrets an entry point's command line holds (credential-like keys, key-shaped values), and the
    environment's: known before Hydra runs, so even its own failure line is masked."""
    found = set(environment_secrets())
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        value = value.strip().strip("'\"")
        if not value:
            continue
        if is_secret_key(key.rsplit(".", 1)[-1]):
            found.add(value)
            if value.startswith("[") and value.endswith("]"):
                found.update(v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip())
        elif looks_like_a_key(value, key):
            found.add(value)
    return frozenset(s for s in found if len(s) >= 4)


class MaskedStream:
    """A text stream that masks known secrets in what is written to it (stderr around Hydra)."""

    def __init__(self, stream, secrets: frozenset[str]):
        self._stream, self._secrets = stream, secrets

    def write(self, text: str) -> int:
        return self._stream.write(mask_text(text, self._secrets))

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def mask_text(text: str, secrets: frozenset[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def mask_run_files(output_dir: str | Path, secrets: frozenset[str]) -> None:
    """Hydra saves the config, the overrides and its own config (with the command line) before the job runs:
    mask the secrets in them, and in this process's command line, which W&B records."""
    import sys

    from mentalglm.fileio.atomic import write_atomic

    if not secrets:
        return
    for folder in Path(output_dir).glob(".*hydra*"):
        for path in folder.glob("*.yaml"):
            text = path.read_text(encoding="utf-8")
            masked = mask_text(text, secrets)
            if masked != text:
                write_atomic(path, masked)
    sys.argv[:] = [mask_text(a, secrets) for a in sys.argv]
