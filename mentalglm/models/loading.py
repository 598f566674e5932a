"""Load a causal LM + tokenizer (hub id, local path or the offline tiny GLM) and wrap it with LoRA."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mentalglm.config import LoraConfig, ModelConfig, TinyModelConfig, as_config, to_dict
from mentalglm.errors import CheckpointError, ConfigError, first_line
from mentalglm.models import packed_attention

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}


def resolve_pretrained(model_cfg: ModelConfig | Mapping[str, Any], cache_dir: str | Path) -> str:
    """The path or hub id to load: `tiny` configs are built once into the cache and loaded like a checkpoint."""
    model_cfg = as_config(ModelConfig, model_cfg)
    if model_cfg.tiny is not None:
        from mentalglm.models.tiny import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint(Path(cache_dir), **to_dict(as_config(TinyModelConfig, model_cfg.tiny))))
    if not model_cfg.pretrained:
        raise ConfigError("model.pretrained is empty: set a hub id (e.g. THUDM/glm-4-9b-chat-hf) or a local path")
    return str(model_cfg.pretrained)


def _remote_code(model_cfg: ModelConfig) -> bool:
    trust = bool(model_cfg.trust_remote_code)
    if trust:
        warnings.warn(
            f"trust_remote_code=true for {model_cfg.pretrained}: this runs Python code shipped with the "
            "checkpoint on your machine. Prefer the native -hf checkpoints (THUDM/glm-4-9b-chat-hf).",
            stacklevel=2,
        )
    return trust


def load_tokenizer(model_cfg: ModelConfig | Mapping[str, Any], cache_dir: str | Path):
    from transformers import AutoTokenizer

    model_cfg = as_config(ModelConfig, model_cfg)
    path = resolve_pretrained(model_cfg, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=_remote_code(model_cfg))
    except OSError as e:  # unknown hub id, no network, missing files: the first line says which
        raise ConfigError(
            f"cannot load model.pretrained={path}: {first_line(e)} (check the Hugging Face id or local "
            "path; offline runs need the model in the HF cache)"
        ) from None
    if tok.pad_token_id is None:
        # GLM-4 pads with <|endoftext|>; for other models the eos is the conventional stand-in.
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(kind: str | None, compute_dtype: torch.dtype):
    if not kind:
        return None
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"model.quantization must be null, 4bit or 8bit, got {kind!r}")


def torch_dtype(model_cfg: ModelConfig):
    if model_cfg.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(sorted(DTYPES))}, got {model_cfg.dtype!r}")
    return DTYPES[model_cfg.dtype]


def load_base_model(model_cfg: ModelConfig | Mapping[str, Any], cache_dir: str | Path):
    from transformers import AutoModelForCausalLM

    model_cfg = as_config(ModelConfig, model_cfg)
    path = resolve_pretrained(model_cfg, cache_dir)
    dtype = torch_dtype(model_cfg)
    quant = quantization_config(model_cfg.quantization, dtype if isinstance(dtype, torch.dtype) else torch.bfloat16)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=_remote_code(model_cfg))
    if model_cfg.attn_implementation:
        if model_cfg.attn_implementation == packed_attention.NAME:
            packed_attention.register()
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    # A quantized base is not passed through peft's prepare_model_for_kbit_training: it casts every weight left
    # unquantized to fp32, at GLM-4's vocabulary 1.2B embedding and LM-head parameters (benchmarks/README.md,
    # QLoRA memory). They stay in model.dtype, as in bf16 LoRA; peft freezes the base either way.
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False  # training default; generation turns the cache on explicitly
    return model


def lora_config(lora_cfg: LoraConfig | Mapping[str, Any]):
    from peft import LoraConfig as PeftLoraConfig

    lora_cfg = as_config(LoraConfig, lora_cfg)
    targets = lora_cfg.target_modules
    return PeftLoraConfig(
        r=int(lora_cfg.r),
        lora_alpha=int(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_targets(model, lora_cfg: LoraConfig) -> None:
    """peft's own error for a target that matches nothing is vague; name the modules that exist."""
    targets = lora_cfg.target_modules
    if isinstance(targets, str):
        return
    leaf_names = {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) or mod.__class__.__name__.startswith("Linear")
    }
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise ConfigError(
            f"lora.target_modules {missing} match no linear module of this model; "
            f"linear modules are: {', '.join(sorted(leaf_names))}"
        )


def apply_lora(
    model,
    lora_cfg: LoraConfig | Mapping[str, Any] | None,
    init_adapter: str | Path | None = None,
    merge_init: bool = False,
):
    """Wrap with a fresh adapter, or continue (or merge then restart from) a saved one. With no `lora_cfg`
    the saved adapter is loaded for inference, as it was trained."""
    from peft import PeftModel, get_peft_model

    if init_adapter:
        check_adapter_dir(init_adapter)
        if lora_cfg is None:
            return PeftModel.from_pretrained(model, str(init_adapter))
    lora_cfg = as_config(LoraConfig, lora_cfg)
    if init_adapter:
        if not merge_init:
            check_same_lora(init_adapter, lora_cfg)
            log.info("continuing LoRA adapter from %s", init_adapter)
            return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        log.info("merging LoRA adapter %s into the base, then starting a fresh adapter", init_adapter)
        model = PeftModel.from_pretrained(model, str(init_adapter)).merge_and_unload()
    check_targets(model, lora_cfg)
    return get_peft_model(model, lora_config(lora_cfg))


def check_adapter_dir(path: str | Path, key: str = "") -> Path:
    """The one check that a path is a loadable LoRA adapter; `key` names the setting it came from."""
    path = Path(path)
    where = f"{key}={path}" if key else str(path)
    if not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{where} is not a LoRA adapter directory (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        # Pickled adapter_model.bin files can run arbitrary code on load; we only accept safetensors.
        raise CheckpointError(f"{where} has no adapter_model.safetensors (pickled .bin adapters are refused)")
    return path


def adapter_lora(path: str | Path) -> dict:
    """r, alpha and target modules of a saved adapter (its adapter_config.json)."""
    import json

    cfg = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    targets = cfg.get("target_modules")
    return {
        "r": cfg.get("r"),
        "alpha": cfg.get("lora_alpha"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
    }


def check_same_lora(path: str | Path, lora_cfg: LoraConfig) -> None:
    """Continuing an adapter trains it with its own r/alpha/targets: a `lora` config that says otherwise would
    be silently ignored, so it is an error."""
    saved = adapter_lora(path)
    targets = lora_cfg.target_modules
    wanted = {
        "r": lora_cfg.r,
        "alpha": lora_cfg.alpha,
        "target_modules": sorted(targets) if not isinstance(targets, str) else targets,
    }
    differ = [
        f"{k} {saved[k]!r} (lora config: {wanted[k]!r})"
        for k in wanted
        if saved[k] is not None and saved[k] != wanted[k]
    ]
    if differ:
        raise ConfigError(
            f"the adapter {path} to continue was trained with {'; '.join(differ)}: continuing it keeps "
            "its own shape. Set lora to match, or merge it and start a fresh adapter "
            "(stages.<stage>.merge_init=true)"
        )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
