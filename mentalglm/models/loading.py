"""Load a causal LM + tokenizer (hub id, local path or the offline tiny GLM) and wrap it with LoRA."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from mentalglm.errors import ConfigError
from mentalglm.models import packed_attention

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}


def resolve_pretrained(model_cfg: Mapping[str, Any], cache_dir: str | Path) -> str:
    """The path or hub id to load: `tiny` configs are built once into the cache and loaded like a checkpoint."""
    if model_cfg.get("tiny"):
        from mentalglm.models.tiny import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint(Path(cache_dir), **dict(model_cfg["tiny"])))
    if not model_cfg.get("pretrained"):
        raise ConfigError("model.pretrained is empty: set a hub id (e.g. THUDM/glm-4-9b-chat-hf) or a local path")
    return str(model_cfg["pretrained"])


def _remote_code(model_cfg: Mapping[str, Any]) -> bool:
    trust = bool(model_cfg.get("trust_remote_code", False))
    if trust:
        warnings.warn(
            f"trust_remote_code=true for {model_cfg.get('pretrained')}: this runs Python code shipped with the "
            "checkpoint on your machine. Prefer the native -hf checkpoints (THUDM/glm-4-9b-chat-hf).",
            stacklevel=2,
        )
    return trust


def load_tokenizer(model_cfg: Mapping[str, Any], cache_dir: str | Path):
    from transformers import AutoTokenizer

    path = resolve_pretrained(model_cfg, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=_remote_code(model_cfg))
    except OSError as e:  # unknown hub id, no network, missing files: the first line says which
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load model.pretrained={path}: {reason} (check the Hugging Face id or local "
                          "path; offline runs need the model in the HF cache)") from None
    if tok.pad_token_id is None:
        # GLM-4 pads with <|endoftext|>; for other models the eos is the conventional stand-in.
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(kind: str | None, compute_dtype: torch.dtype):
    if not kind:
        return None
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"model.quantization must be null, '4bit' or '8bit', got {kind!r}")


def load_base_model(model_cfg: Mapping[str, Any], cache_dir: str | Path):
    from transformers import AutoModelForCausalLM

    path = resolve_pretrained(model_cfg, cache_dir)
    dtype_name = str(model_cfg.get("dtype", "auto"))
    if dtype_name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    dtype = DTYPES[dtype_name]
    quant = quantization_config(model_cfg.get("quantization"), dtype if isinstance(dtype, torch.dtype) else torch.bfloat16)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=_remote_code(model_cfg))
    if model_cfg.get("attn_implementation"):
        if model_cfg["attn_implementation"] == packed_attention.NAME:
            packed_attention.register()
        kwargs["attn_implementation"] = model_cfg["attn_implementation"]
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(model_cfg.get("gradient_checkpointing", False)))
    elif model_cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False  # training default; generation turns the cache on explicitly
    return model


def lora_config(lora_cfg: Mapping[str, Any]):
    from peft import LoraConfig

    targets = lora_cfg.get("target_modules")
    targets = targets if isinstance(targets, str) else list(targets)
    return LoraConfig(
        r=int(lora_cfg["r"]),
        lora_alpha=int(lora_cfg["alpha"]),
        lora_dropout=float(lora_cfg.get("dropout", 0.0)),
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_targets(model, lora_cfg: Mapping[str, Any]) -> None:
    """peft's own error for a target that matches nothing is vague; name the modules that exist."""
    targets = lora_cfg.get("target_modules")
    if isinstance(targets, str):
        return
    leaf_names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
                  or mod.__class__.__name__.startswith("Linear")}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} match no linear module of this model; "
                          f"linear modules are: {', '.join(sorted(leaf_names))}")


def apply_lora(model, lora_cfg: Mapping[str, Any], init_adapter: str | Path | None = None, merge_init: bool = False):
    """Wrap with a fresh adapter, or continue (or merge then restart from) a saved one."""
    from peft import PeftModel, get_peft_model

    if init_adapter:
        check_adapter_dir(init_adapter)
        if not merge_init:
            log.info("continuing LoRA adapter from %s", init_adapter)
            return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        log.info("merging LoRA adapter %s into the base, then starting a fresh adapter", init_adapter)
        model = PeftModel.from_pretrained(model, str(init_adapter)).merge_and_unload()
    check_targets(model, lora_cfg)
    return get_peft_model(model, lora_config(lora_cfg))


def check_adapter_dir(path: str | Path) -> None:
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a LoRA adapter directory (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        # Pickled adapter_model.bin files can run arbitrary code on load; we only accept safetensors.
        raise FileNotFoundError(f"{path} has no adapter_model.safetensors (pickled .bin adapters are refused)")


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
