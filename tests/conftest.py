"""Shared pytest fixtures. Several engineers append here: add new sections, do not rewrite others'."""

import pytest


# ----------------------------------------------------------------------------- tiny GLM (models/tiny.py)

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
