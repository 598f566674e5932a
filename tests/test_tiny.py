import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GlmForCausalLM

from mentalglm.models.tiny import (
    GLM4_SPECIAL_TOKENS,
    GLM4_STOP_TOKENS,
    build_tiny_model,
    build_tiny_tokenizer,
    ensure_tiny_checkpoint,
    stop_token_ids,
)


def test_special_tokens_by_name(tiny_tokenizer):
    vocab = tiny_tokenizer.get_vocab()
    assert all(t in vocab for t in GLM4_SPECIAL_TOKENS)
    assert len({vocab[t] for t in GLM4_SPECIAL_TOKENS}) == len(GLM4_SPECIAL_TOKENS)
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == "<|endoftext|>"
    assert stop_token_ids(tiny_tokenizer) == [vocab[t] for t in GLM4_STOP_TOKENS]
    # Special tokens sit after the BPE vocabulary, as in the real tokenizer.
    assert min(vocab[t] for t in GLM4_SPECIAL_TOKENS) == len(vocab) - len(GLM4_SPECIAL_TOKENS)


def test_plain_tokenization_adds_gmask_sop_like_the_hf_tokenizer(tiny_tokenizer):
    prefix = tiny_tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    ids = tiny_tokenizer("hello")["input_ids"]
    assert ids[:2] == prefix and prefix[0] not in ids[2:]
    assert tiny_tokenizer("hello", add_special_tokens=False)["input_ids"] == ids[2:]


def test_chat_template_matches_glm4(tiny_tokenizer):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "你好"}]
    text = tiny_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "[gMASK]<sop><|system|>\nS<|user|>\n你好<|assistant|>"
    convo = msgs + [{"role": "assistant", "content": "好的"}]
    assert tiny_tokenizer.apply_chat_template(convo, tokenize=False).endswith("<|assistant|>\n好的")
    ids = tiny_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids.count(tiny_tokenizer.convert_tokens_to_ids("[gMASK]")) == 1


def test_common_chinese_characters_are_single_tokens(tiny_tokenizer):
    for ch in "该帖子的发布者有高低自杀风险问题考虑以下":
        assert len(tiny_tokenizer(ch, add_special_tokens=False)["input_ids"]) == 1, ch
    text = "考虑以下帖子：I feel stressed, 压力很大。"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_tokenizer_is_deterministic():
    corpus = ["考虑以下帖子：今天心情不好。", "I feel lonely and tired."] * 3
    a, b = build_tiny_tokenizer(corpus, vocab_size=400), build_tiny_tokenizer(corpus, vocab_size=400)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_tiny_model_is_glm4_shaped(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, hidden_size=32, num_layers=1)
    cfg = model.config
    assert isinstance(model, GlmForCausalLM)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5 and cfg.attention_bias
    assert cfg.pad_token_id == tiny_tokenizer.pad_token_id
    assert cfg.eos_token_id == stop_token_ids(tiny_tokenizer)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    out = model(torch.tensor([tiny_tokenizer("你好")["input_ids"]]))
    assert out.logits.shape[-1] == len(tiny_tokenizer)
    # Same seed, same weights.
    again = build_tiny_model(tiny_tokenizer, hidden_size=32, num_layers=1)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)


def test_checkpoint_loads_like_a_hub_checkpoint(tiny_checkpoint, tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert isinstance(model, GlmForCausalLM)
    assert tok.chat_template == tiny_tokenizer.chat_template
    assert tok("考虑以下帖子")["input_ids"] == tiny_tokenizer("考虑以下帖子")["input_ids"]
    assert model.generation_config.eos_token_id == stop_token_ids(tok)
    assert model.config.pad_token_id == tok.pad_token_id


def test_checkpoint_is_cached_and_written_atomically(tmp_path):
    corpus = ["考虑以下帖子：今天心情不好。", "I feel lonely."]
    path = ensure_tiny_checkpoint(tmp_path, corpus=corpus, vocab_size=300, hidden_size=16, num_layers=1)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tmp_path, corpus=corpus, vocab_size=300, hidden_size=16, num_layers=1) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    other = ensure_tiny_checkpoint(tmp_path, corpus=corpus, vocab_size=300, hidden_size=16, num_layers=2)
    assert other != path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other.name])  # no temp dirs left
