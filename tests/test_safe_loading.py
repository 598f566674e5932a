"""Safe loading: no remote code unless configured (with a warning naming the risk), no unpickling of arbitrary
objects from adapters or checkpoints, and a checkpoint of another base model or LoRA shape refused clearly."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FAST_DEMO, ROOT

from mentalglm.errors import CheckpointError
from mentalglm.models import loading

S2 = [*FAST_DEMO, "variant=s2", "test=false"]


@pytest.fixture
def captured(monkeypatch):
    """The kwargs every from_pretrained call receives."""
    import transformers

    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def spy(klass, path, *args, _original=original, **kwargs):
            calls.append(kwargs)
            return _original(klass, path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_remote_code_is_off_unless_configured(tiny_checkpoint, captured):
    model_cfg = {"name": "local", "pretrained": str(tiny_checkpoint), "dtype": "float32"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no remote-code warning either
        loading.load_tokenizer(model_cfg, "unused")
        loading.load_base_model(model_cfg, "unused")
    assert [c["trust_remote_code"] for c in captured] == [False, False]


def test_remote_code_when_configured_warns_naming_the_risk(tiny_checkpoint, captured):
    model_cfg = {"name": "local", "pretrained": str(tiny_checkpoint), "dtype": "float32", "trust_remote_code": True}
    with pytest.warns(UserWarning, match="runs Python code shipped with the checkpoint on your machine"):
        loading.load_tokenizer(model_cfg, "unused")
    assert captured[-1]["trust_remote_code"] is True


def test_every_model_and_classifier_config_keeps_remote_code_off():
    paths = sorted((ROOT / "conf" / "model").glob("*.yaml")) + sorted((ROOT / "conf" / "classifier").glob("*.yaml"))
    assert len(paths) > 10
    for path in paths:
        assert "trust_remote_code: true" not in path.read_text().lower(), path


def test_package_loads_torch_files_only_with_weights_only():
    sources = sorted((ROOT / "mentalglm").rglob("*.py")) + [ROOT / "train.py", ROOT / "evaluate.py"]
    for path in sources:
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"
    assert (
        "weights_only=True)"
        in (ROOT / "mentalglm" / "commands" / "train.py").read_text().split("trainer.fit(", 1)[1][:200]
    )


def test_pickled_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    torch.save({"lora": torch.zeros(2)}, tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors .pickled .bin adapters are refused"):
        loading.check_adapter_dir(tmp_path)


class Payload:
    """Unpickling this runs `open(marker, "w")`: what a malicious checkpoint would do with worse code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def last_line(proc) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_checkpoint_with_pickled_objects_is_refused(run_cli, tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "extra": Payload(marker)}, evil)
    proc = run_cli("train.py", *S2, f"ckpt_path={evil}", check=False)
    line = last_line(proc)
    assert line.startswith(f"error: refusing to load {evil}: it holds pickled objects")
    assert not marker.exists()


@pytest.mark.slow
def test_truncated_checkpoint_is_a_clear_error(run_cli, tmp_path):
    broken = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, broken)
    broken.write_bytes(broken.read_bytes()[:500])  # what a crash mid-copy leaves
    line = last_line(run_cli("train.py", *S2, f"ckpt_path={broken}", check=False))
    assert line.startswith(f"error: {broken} is not a readable checkpoint")


@pytest.mark.slow
def test_checkpoint_of_other_lora_shape_or_base_is_refused(run_cli, tmp_path):
    quick = [
        *S2,
        "stages.two.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "data.limit_eval=1",
        "generation.val_max_new_tokens=2",
    ]
    run_cli("train.py", *quick)
    (ckpt,) = (tmp_path / "outputs" / "train").glob("*/runs/*/stage_two/checkpoints/last.ckpt")

    line = last_line(run_cli("train.py", *quick, f"ckpt_path={ckpt}", "lora.r=8", check=False))
    assert "the checkpoint does not fit this run: it was trained with lora_r 16 (this run: 8)" in line
    assert "Use the model and lora settings it was trained with" in line

    line = last_line(
        run_cli("train.py", *quick, f"ckpt_path={ckpt}", "lora.target_modules=[q_proj,v_proj]", check=False)
    )
    assert "target_modules" in line and "'q_proj', 'v_proj'" in line

    # Same model name, different architecture: the adapter shapes give it away.
    line = last_line(run_cli("train.py", *quick, f"ckpt_path={ckpt}", "model.tiny.hidden_size=64", check=False))
    assert "the checkpoint does not fit this run" in line and "has shape" in line
