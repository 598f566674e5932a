"""QLoRA for real: 4-bit and 8-bit (bitsandbytes) bases trained through the project's loading path on CPU."""

from __future__ import annotations

import pytest
import torch

from mentalglm.data.render import IGNORE_INDEX
from mentalglm.models.loading import apply_lora, load_base_model
from mentalglm.models.loss import logits_selection, supervised_loss

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


@pytest.mark.parametrize("quantization,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_a_quantized_base_trains_saves_and_reloads(tmp_path, cli_cache, quantization, layer):
    pytest.importorskip("bitsandbytes")
    from conftest import ROOT
    from omegaconf import OmegaConf
    from peft import PeftModel

    model_cfg = {
        **OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_glm.yaml")),
        "quantization": quantization,
    }
    torch.manual_seed(0)
    model = apply_lora(load_base_model(model_cfg, cli_cache), LORA)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == layer  # the base really is quantized
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 200, (4, 48), generator=g)
    labels = ids.clone()
    labels[:, :32] = IGNORE_INDEX  # the prompt part
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = supervised_loss(model, batch, logits_selection(model))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5, losses

    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_base_model(model_cfg, cli_cache), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_a_quantized_base_keeps_its_unquantized_weights_in_the_model_dtype(cli_cache, quantization):
    """Embeddings, LM head and norms stay bf16 (peft's prepare_model_for_kbit_training would make them fp32,
    doubling them), and a step with gradient checkpointing still reaches the adapter."""
    pytest.importorskip("bitsandbytes")
    from conftest import ROOT
    from omegaconf import OmegaConf

    model_cfg = {
        **OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_glm.yaml")),
        "dtype": "bfloat16",
        "quantization": quantization,
        "gradient_checkpointing": True,
    }
    torch.manual_seed(0)
    model = apply_lora(load_base_model(model_cfg, cli_cache), LORA)
    base = model.get_base_model()
    unquantized = [base.model.embed_tokens.weight, base.lm_head.weight, base.model.norm.weight]
    assert all(p.dtype == torch.bfloat16 for p in unquantized)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    ids = torch.randint(10, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    model.train()
    loss = supervised_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, "mask")
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and grads and all(g is not None and g.abs().sum() > 0 for g in grads)
