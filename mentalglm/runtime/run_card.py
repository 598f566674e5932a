"""A saved adapter carries its run: what it was trained with, so `run_dir=` or `adapter=` alone restores it.

train.py writes `mentalglm.json` beside the PEFT files of every best adapter: the base model (pretrained, chat,
dtype, quantization, ...), LoRA, the data config (task set, files, templates, task descriptions) and the
generation settings, all resolved. evaluate, predict, serve, export and train_classifier start from it: a setting
given on the command line wins, unless it changes the prompts or the base model the adapter was trained with
(another model config, pretrained, chat, template, system prompt, task templates or descriptions): that is an
error naming both values, unless `force=true` says it is meant.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mentalglm.config import to_dict
from mentalglm.errors import ConfigError
from mentalglm.fileio.atomic import write_atomic

log = logging.getLogger(__name__)

CARD = "mentalglm.json"
CARD_VERSION = 1
SECTIONS = ("model", "lora", "data", "generation")
# Settings that change the prompts or the base model: overriding one against the run needs force=true.
BINDING = (
    "model.name",
    "model.pretrained",
    "model.chat",
    "model.base_template",
    "model.system",
    "model.tiny",
    "data.templates",
    "data.task_description",
)
# The commands that restore a run, and the sections each takes from it.
RESTORED = {
    "evaluate": ("model", "data", "generation"),
    "predict": ("model", "data", "generation"),
    "serve": ("model", "data", "generation"),
    "export": ("model", "data"),
    "train_classifier": ("data",),
    "expert_eval": ("data",),  # action=sample run_dir=TRAIN_RUN: the run's test split and answers
}


def run_card(cfg: DictConfig, **extra: Any) -> dict:
    """What an adapter of this run was trained with (resolved), plus `extra` (stage, scores, ...). Credentials are
    left out (keys that look like them or `secret_keys` names; values holding a secret are masked): a command
    using the card takes them from its own environment."""
    from mentalglm.tracking import config_secrets, is_secret_key, redact_secrets

    keys = frozenset(str(k).lower() for k in (cfg.get("secret_keys") or []))

    def drop(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: drop(v) for k, v in node.items() if not is_secret_key(k, keys)}
        return [drop(v) for v in node] if isinstance(node, list) else node

    card = {"mentalglm_card": CARD_VERSION, **{s: to_dict(cfg[s]) for s in SECTIONS if cfg.get(s) is not None}}
    card["seed"] = int(cfg.seed)
    return redact_secrets(drop({**card, **extra}), config_secrets(cfg), keys)


def write_card(adapter_dir: Path, card: dict) -> None:
    """Into a directory being written (replace_dir_atomic's temporary one)."""
    write_atomic(Path(adapter_dir) / CARD, json.dumps(card, ensure_ascii=False, indent=1) + "\n")


def read_card(adapter_dir: str | Path | None) -> dict | None:
    """The card of an adapter directory, or None (an adapter saved before cards, or by other tools)."""
    if not adapter_dir:
        return None
    path = Path(adapter_dir) / CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{path}: not a readable run card ({type(e).__name__}); delete it to load the adapter bare"
        ) from None
    if not isinstance(card, dict) or card.get("mentalglm_card") != CARD_VERSION:
        raise ConfigError(f"{path}: not a run card of this version (mentalglm_card: {CARD_VERSION})")
    return card


def command_line() -> list[tuple[str, bool]]:
    """(key, is a group choice) of every override on the command line (none outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return []
    from mentalglm.cli import CONF_DIR

    out = []
    for o in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        key = o.key_or_group
        out.append((key, "." not in key and (CONF_DIR / key).is_dir()))
    return out


def restore_run(cfg: DictConfig, adapter_dir: str | None, overrides: list[tuple[str, bool]] | None = None) -> None:
    """Replace `cfg`'s model/data/generation sections (as `RESTORED` names for the command) with the card's of
    `adapter_dir`, keeping what the command line set; a binding setting that contradicts the run is an error."""
    card = read_card(adapter_dir)
    sections = RESTORED.get(str(cfg.get("task_name")), ())
    if card is None or not sections:
        return
    overrides = command_line() if overrides is None else overrides
    force = bool(cfg.get("force"))
    chosen_groups = {k for k, group in overrides if group}
    dotted = [k for k, group in overrides if not group and k.split(".", 1)[0] in sections]
    restored = {}
    for section in sections:
        if section not in card:
            continue
        run_value = card[section]
        if section in chosen_groups and section != "data":
            _check(f"{section}.name", cfg[section].get("name"), run_value.get("name"), force, section)
        value = dict(run_value)
        if section == "data" and "data" in chosen_groups:
            # Another data config (e.g. data=clinical): its files and tasks, the run's templates and descriptions.
            value = {**to_dict(cfg.data), "templates": run_value.get("templates", {})}
            for key in ("task_description", "max_length"):
                value[key] = run_value.get(key, value.get(key))
        restored[section] = value
    for key in dotted:  # what the command line set wins (after the check that it may)
        section, rest = key.split(".", 1)
        given = OmegaConf.select(cfg, key)
        given = to_dict(given) if isinstance(given, DictConfig) else given
        if any(key == b or key.startswith(b + ".") or b.startswith(key + ".") for b in BINDING):
            _check(key, given, _select(card, key), force, key)
        _assign(restored[section], rest, given)
    with open_dict(cfg):
        for section, value in restored.items():
            schema = OmegaConf.get_type(cfg[section])  # the section's dataclass: assigned as one, checked
            cfg[section] = OmegaConf.merge(OmegaConf.structured(schema), value) if schema is not dict else value
    log.info(
        "restored %s from the run card %s (model %s, data %s)",
        ", ".join(restored),
        Path(adapter_dir) / CARD,
        OmegaConf.select(cfg, "model.name"),
        OmegaConf.select(cfg, "data.name"),
    )


def _select(card: dict, key: str) -> Any:
    node: Any = card
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _assign(node: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _check(key: str, given: Any, trained: Any, force: bool, shown: str) -> None:
    if given == trained or force:
        if given != trained:
            log.warning("force=true: %s=%s although the adapter was trained with %s", key, given, trained)
        return
    raise ConfigError(
        f"{shown}: {given!r} contradicts the run, whose adapter was trained with {key}={trained!r} (it would change "
        "the prompts or the base model); drop the override, or add force=true if that is meant"
    )


def model_card(card: dict, test: dict | None = None) -> str:
    """The adapter's README.md (in place of PEFT's empty template): base model, tasks and prompt format, training
    data, the run's metrics, and the research-use notice."""
    from mentalglm.reporting.writer import SCREENING_NOTICE

    model, data, lora = card.get("model", {}), card.get("data", {}), card.get("lora") or {}
    base = model.get("pretrained") or f"{model.get('name')} (a tiny random model built offline)"
    trained = card.get("trained_tasks") or data.get("select") or list(data.get("tasks", {}))
    answers = data.get("answers", "explained")
    lines = [
        "---",
        "library_name: peft",
        *([f"base_model: {model['pretrained']}"] if model.get("pretrained") else []),
        "tags: [mentalglm, lora, mental-health, research-only]",
        "---",
        "",
        f"# MentalGLM adapter: {model.get('name')}, stage {card.get('stage', '?')}",
        "",
        f"> {SCREENING_NOTICE}",
        "",
        f"- **Base model**: {base} ({'chat template' if model.get('chat') else 'plain prompt'}, "
        f"dtype {model.get('dtype')}{', ' + str(model.get('quantization')) if model.get('quantization') else ''})",
        f"- **LoRA**: r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
        f"targets {lora.get('target_modules')}",
        f"- **Training data**: data={data.get('name')}, answers {answers}"
        + (" (the label sentence only: no explanations)" if answers == "label_only" else " (label, then explanation)"),
        f"- **Tasks trained in this stage**: {', '.join(trained)}",
        f"- **Task descriptions in the prompt**: {bool(data.get('task_description'))}; "
        f"max prompt length {data.get('max_length')} tokens",
        f"- **Seed**: {card.get('seed')}",
    ]
    if data.get("templates"):
        lines.append(f"- **Template overrides**: {json.dumps(data['templates'], ensure_ascii=False)}")
    if card.get("best_score") is not None:
        lines.append(f"- **Best validation {card.get('monitor') or 'score'}**: {card['best_score']:.4f}")
    if test:
        f1 = {k: v.get("f1") for k, v in test.items() if isinstance(v, dict) and v.get("f1") is not None}
        lines += ["", "## Test F1 (%)", "", "| task | F1 |", "| :--- | ---: |"]
        lines += [f"| {k} | {100 * v:.2f} |" for k, v in f1.items()]
    lines += [
        "",
        "## Use",
        "",
        "Its run card (`mentalglm.json`) restores the model, tasks, templates and generation settings:",
        "",
        "    python predict.py adapter=THIS_DIR task=TASK \"text='...'\"",
        "    python evaluate.py adapter=THIS_DIR",
        "",
    ]
    return "\n".join(lines)


def data_source(cfg: DictConfig, names: list[str], split: str) -> dict:
    """Which data a score is on, for metrics.json and the paper tables: the data config's name and answers kind,
    the split, and each task's file of that split (for a validation split carved from training, that file)."""
    files = {}
    for name in names:
        spec = cfg.data.tasks.get(name) or {}
        held_out = split == "val" and spec.get("train") and spec.get("val_size")
        files[name] = spec.get(split) or (f"{spec.get('train')} (held out)" if held_out else None)
    return {"name": cfg.data.get("name"), "answers": cfg.data.get("answers"), "split": split, "files": files}
