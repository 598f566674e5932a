"""End-to-end: train.py through Hydra (subprocess) on the tiny model and the bundled fixtures."""

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST_DEMO

pytestmark = pytest.mark.slow

C_IMHI_KEYS = {"sos_hl_1k", "socialcd_3k", "cp_parent", "cp_child"}


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "outputs" / "train").glob("*/runs/*"))


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def trainable_numel(adapter_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(adapter_dir / "adapter_model.safetensors").values())


def test_demo_full_variant_chains_stages_and_tests(run_cli, tmp_path):
    run_cli("train.py", *FAST_DEMO)
    (run,) = run_dirs(tmp_path)
    summary = summary_of(run)
    assert list(summary["stages"]) == ["one", "two"]
    one, two = summary["stages"]["one"], summary["stages"]["two"]
    assert one["init_adapter"] is None
    assert two["init_adapter"] == one["best_adapter"]  # stage two continues stage one's best adapter
    assert summary["best_adapter"] == two["best_adapter"]
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert C_IMHI_KEYS <= set(metrics)
    for key in C_IMHI_KEYS:
        assert 0 <= metrics[key]["f1"] <= 1 and metrics[key]["n"] > 0
    assert "Majority F1" in (run / "test" / "results.md").read_text()
    # The split is saved with the run, and each stage's W&B run is its own offline directory.
    assert (run / "stage_one" / "split.json").is_file() and (run / "stage_two" / "split.json").is_file()
    assert len(list(run.glob("stage_*/wandb/offline-run-*"))) == 2

    # Checkpoints hold the adapter (and optimiser state), never the frozen base.
    ckpt = torch.load(two["best_checkpoint"], map_location="cpu", weights_only=True)
    weights = ckpt["state_dict"]
    assert weights and all("lora_" in k for k in weights)
    adapter_numel = trainable_numel(Path(two["best_adapter"]))
    assert sum(t.numel() for t in weights.values()) == adapter_numel
    base_numel = sum(t.numel() for t in _base_model(Path(two["best_adapter"])).parameters())
    assert adapter_numel < base_numel / 5
    assert Path(two["best_checkpoint"]).stat().st_size < 4 * 4 * adapter_numel + 2_000_000  # weights + AdamW moments
    assert ckpt["mentalglm"]["lora_r"] == 16 and "optimizer_states" in ckpt


def _base_model(adapter_dir: Path):
    from transformers import AutoModelForCausalLM

    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    return AutoModelForCausalLM.from_pretrained(base).eval()


def test_exported_adapter_reproduces_trained_logits(run_cli, tmp_path):
    """PeftModel.from_pretrained(base, best_adapter) == the model as trained (the best checkpoint's weights)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    run_cli("train.py", *FAST_DEMO, "variant=s2")
    (run,) = run_dirs(tmp_path)
    stage = summary_of(run)["stages"]["two"]
    adapter = Path(stage["best_adapter"])
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])

    exported = PeftModel.from_pretrained(_base_model(adapter), str(adapter)).eval()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    rebuilt = get_peft_model(
        _base_model(adapter),
        LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"], lora_dropout=0.0),
    )
    state = torch.load(stage["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    missing = rebuilt.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    assert not missing.unexpected_keys
    rebuilt.eval()
    with torch.no_grad():
        a, b = exported(input_ids=ids).logits, rebuilt(input_ids=ids).logits
        base = _base_model(adapter)(input_ids=ids).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, base, atol=1e-4)  # the adapter is not a no-op


def test_s1_registers_stage_one_and_stage_two_picks_it_up(run_cli, tmp_path):
    run_cli("train.py", *FAST_DEMO, "variant=s1", "test=false")
    (s1,) = run_dirs(tmp_path)
    stage_one_adapter = summary_of(s1)["stages"]["one"]["best_adapter"]
    (registry,) = (tmp_path / "outputs" / "registry" / "tiny_glm" / "seed42" / "stage_one").glob("*.json")
    entry = json.loads(registry.read_text())
    assert entry["adapter"] == str(Path(stage_one_adapter).resolve())
    assert entry["identity"]["experiment"] == "demo" and entry["identity"]["lora"]["r"] == 16

    # A plain `stage=two` run (no variant) continues the registered stage-one adapter of the same model+seed.
    run_cli("train.py", *FAST_DEMO, "~variant", "stage=two", "stages.two.max_epochs=1", "test=false")
    two = [r for r in run_dirs(tmp_path) if r != s1]
    assert len(two) == 1
    assert summary_of(two[0])["stages"]["two"]["init_adapter"] == str(Path(stage_one_adapter).resolve())


def test_variant_s1_ends_with_c_imhi_test(run_cli, tmp_path):
    run_cli("train.py", *FAST_DEMO, "variant=s1")
    (run,) = run_dirs(tmp_path)
    assert list(summary_of(run)["stages"]) == ["one"]
    assert C_IMHI_KEYS <= set(json.loads((run / "test" / "metrics.json").read_text()))


def test_stage_two_without_stage_one_is_a_clear_error(run_cli, tmp_path):
    proc = run_cli("train.py", *FAST_DEMO, "~variant", "stage=two", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "python train.py stage=one model=tiny_glm seed=42" in last
    assert "Traceback" not in proc.stderr


def test_merge_init_adapter_starts_a_fresh_adapter(run_cli, tmp_path):
    run_cli("train.py", *FAST_DEMO, "variant=s1", "test=false")
    run_cli(
        "train.py",
        *FAST_DEMO,
        "~variant",
        "stage=two",
        "stages.two.max_epochs=1",
        "test=false",
        "stages.two.merge_init=true",
        "data.limit_eval=4",
    )
    runs = run_dirs(tmp_path)
    two = summary_of(runs[-1])["stages"]["two"]
    log = (runs[-1] / "train.log").read_text()
    assert "merging LoRA adapter" in log and two["init_adapter"]


def test_stage_one_can_select_by_mentallama_weighted_f1(run_cli, tmp_path):
    monitor = "callbacks.model_checkpoint.monitor=val/f1_weighted_mean"
    run_cli("train.py", *FAST_DEMO, "variant=s1", "test=false", monitor)
    (run,) = run_dirs(tmp_path)
    stage = summary_of(run)["stages"]["one"]
    assert stage["monitor"] == "val/f1_weighted_mean" and 0 <= stage["best_val_f1_mean"] <= 1
    assert Path(stage["best_adapter"]).is_dir()
