"""What export.py runs: the adapter merged into its base and saved as a standalone checkpoint (safetensors, with
the tokenizer), for engines without LoRA support. Before the checkpoint takes its place, its logits on probe
prompts of every task are compared with the unmerged adapter's; a difference beyond `check_tolerance` is an
error and nothing is left behind."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mentalglm.config import ModelConfig, as_config
from mentalglm.errors import ConfigError
from mentalglm.fileio.atomic import replace_dir_atomic
from mentalglm.models.loading import DTYPES, apply_lora, load_base_model, load_tokenizer
from mentalglm.runtime.builders import build_tasks, resolve_adapter

log = logging.getLogger(__name__)
PROBE = {"zh": "最近总是睡不着，觉得一切都没有意义。", "en": "I have not slept for days and nothing feels worth it."}


@torch.inference_mode()
def probe_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([p], device=model.device)).logits.float().cpu() for p in prompts]


def export(cfg: DictConfig) -> Path:
    from mentalglm.data.render import render_prompt

    adapter = resolve_adapter(cfg)
    if adapter is None:
        raise ConfigError("export needs adapter=PATH or run_dir=PATH: there is nothing to merge into the base")
    model_cfg = as_config(ModelConfig, OmegaConf.to_container(cfg.model, resolve=True))
    if model_cfg.quantization:
        raise ConfigError(
            "export merges into a full-precision base: set model.quantization=null (a 4/8-bit base "
            "cannot hold the merged weights)"
        )
    out = Path(cfg.output) if cfg.get("output") else Path(cfg.output_dir) / "merged"
    tokenizer = load_tokenizer(model_cfg, cfg.paths.cache_dir)
    tasks = build_tasks(cfg)
    prompts = [
        render_prompt(
            tokenizer,
            t.format_query(PROBE[t.language], t.aspects[0] if t.aspects else "")[0],
            chat=model_cfg.chat,
            base_template=model_cfg.base_template,
            system=model_cfg.system,
        )
        for t in tasks.values()
    ]
    peft_model = apply_lora(load_base_model(model_cfg, cfg.paths.cache_dir), None, adapter).eval()
    before = probe_logits(peft_model, prompts)
    merged = peft_model.merge_and_unload().eval()
    after = probe_logits(merged, prompts)
    worst = max(float((a - b).abs().max()) for a, b in zip(before, after))
    if worst > cfg.check_tolerance:
        raise ConfigError(
            f"the merged model's logits differ from the adapter's by {worst:.3g} (check_tolerance="
            f"{cfg.check_tolerance}); nothing was written"
        )
    if cfg.get("dtype"):
        if cfg.dtype not in DTYPES or cfg.dtype == "auto":
            raise ConfigError(f"dtype={cfg.dtype} is not one of {', '.join(k for k in DTYPES if k != 'auto')}")
        merged = merged.to(DTYPES[cfg.dtype])
    merged.config.use_cache = True

    def write(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    replace_dir_atomic(out, write)
    log.info(
        "merged %s into %s -> %s (max logit difference %.2e on %d probe prompts)",
        adapter,
        model_cfg.pretrained or model_cfg.name,
        out,
        worst,
        len(prompts),
    )
    print(f"merged checkpoint: {out} (max |logit difference| vs the adapter: {worst:.2e})")
    return out
