"""Shared pytest fixtures, one section per concern: the tiny model, composed configs, CLI runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# ----------------------------------------------------------------------------- the tiny GLM (models/tiny.py)
@pytest.fixture(scope="session")
def tiny_tokenizer():
    """GLM-4-like tokenizer trained in-process (fixtures + task templates)."""
    from mentalglm.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny GLM checkpoint directory, loadable with AutoTokenizer / AutoModelForCausalLM."""
    from mentalglm.models.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny_glm"), hidden_size=32, num_layers=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny GLM loaded through the real loading path, in eval mode (fp32, CPU)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="session")
def tiny_hf_tokenizer(tiny_checkpoint):
    """The tiny tokenizer as loaded back from disk (what training and evaluation see)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


# ----------------------------------------------------------------------------- composed configs (conf/)
def compose_config(
    overrides: list[str], config_name: str = "train.yaml", output_dir: str | Path | None = None, resolve: bool = True
):
    """A config as the entry point composes it (schemas registered, ${hydra:...} resolvable), without `hydra`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from mentalglm.config import register_configs
    from mentalglm.runtime.resume import register_resolvers

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        OmegaConf.set_readonly(cfg.hydra, False)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir or "/tmp/mentalglm-compose")
            cfg.hydra.runtime.cwd = str(ROOT)
        HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve
        with open_dict(cfg):
            del cfg["hydra"]
        if resolve:
            OmegaConf.resolve(cfg)
        return cfg


# ----------------------------------------------------------------------------- end-to-end runs of the entry points
# The demo, cut down for tests: one short epoch per stage, a few validation/test items per split.
FAST_DEMO = [
    "experiment=demo",
    "stages.one.max_epochs=1",
    "stages.two.max_epochs=2",
    "data.limit_eval=6",
    "generation.max_new_tokens=24",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="session")
def cli_cache(tmp_path_factory):
    """One cache (tiny checkpoint, tokenized datasets) shared by every CLI run of the session."""
    return tmp_path_factory.mktemp("cli_cache")


def cli_env(outputs: Path) -> dict:
    """The environment of an entry-point subprocess: outputs under `outputs`, W&B offline, and one thread (the
    tiny model gains nothing from two, sweeps run jobs side by side, and runs whose numbers a test compares must
    use the same thread count to be bit-identical)."""
    return {
        **os.environ,
        "MENTALGLM_OUTPUT": str(outputs),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


@pytest.fixture
def run_cli(tmp_path, cli_cache):
    """Run an entry point (`train.py`, `evaluate.py`, ...) in a subprocess with outputs under tmp_path/outputs.

    Returns the CompletedProcess; `check=True` (default) fails the test with the tail of the output.
    """

    def run(script: str, *overrides: str, check: bool = True, env: dict | None = None, timeout: int = 600):
        full_env = {**cli_env(tmp_path / "outputs"), **(env or {})}
        cmd = [sys.executable, str(ROOT / script), f"paths.cache_dir={cli_cache}", *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd[1:])} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    return run
