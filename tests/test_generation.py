import pytest
import torch
from peft import LoraConfig, get_peft_model

from mentalglm.data.render import render_prompt
from mentalglm.runtime.generation import StopOnStrings, cut_at_stop_strings, generate, stop_token_ids

QUERIES = [
    "你好",
    '考虑以下帖子："我最近压力很大，每天晚上都睡不着。" 问题：这个帖子的发布者的自杀风险是高还是低？',
    'Consider this post: "I feel lonely." Question: Does the poster suffer from loneliness?',
    "我很累",
    'Consider this post: "My boss keeps yelling at me and I can\'t sleep." Question: What is the stress '
    "cause of this post?",
]


@pytest.fixture(scope="module")
def prompts(tiny_hf_tokenizer):
    return [render_prompt(tiny_hf_tokenizer, q, chat=True) for q in QUERIES]


@pytest.fixture(scope="module")
def unbatched(tiny_model, tiny_hf_tokenizer, prompts):
    return generate(tiny_model, tiny_hf_tokenizer, prompts, batch_size=1, max_new_tokens=12)


def test_batched_greedy_equals_unbatched(tiny_model, tiny_hf_tokenizer, prompts, unbatched):
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: real left padding
    assert any(unbatched)
    assert generate(tiny_model, tiny_hf_tokenizer, prompts, batch_size=3, max_new_tokens=12) == unbatched
    assert (
        generate(tiny_model, tiny_hf_tokenizer, prompts, batch_size=16, max_new_tokens=12, sort_by_length=False)
        == unbatched
    )


def test_stop_strings_cut_generation(tiny_model, tiny_hf_tokenizer, prompts, unbatched, monkeypatch):
    # Use a piece of a real continuation as the stop string: generation must end before it.
    row = max(range(len(unbatched)), key=lambda i: len(unbatched[i]))
    text = unbatched[row]
    mid = next(i for i in range(len(text) // 2, len(text)) if not text[i].isspace())
    stop = text[mid]
    widths = []
    real_generate = tiny_model.generate

    def spy(**kwargs):
        out = real_generate(**kwargs)
        widths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(tiny_model, "generate", spy)
    outs = generate(tiny_model, tiny_hf_tokenizer, [prompts[row]], max_new_tokens=12, stop_strings=[stop])
    assert outs == [text[: text.find(stop)].strip()]
    assert widths[0] < 12  # generation really stopped early, the text was not just cut afterwards


def test_stopping_criterion_is_per_row(tiny_hf_tokenizer):
    tok = tiny_hf_tokenizer
    rows = [
        tok("ab推理：x", add_special_tokens=False)["input_ids"],
        tok("abcdefgh", add_special_tokens=False)["input_ids"],
    ]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    done = StopOnStrings(tok, ["推理", "Reasoning:"], prompt_width=1)(ids, None)
    assert done.dtype == torch.bool and done.tolist() == [True, False]
    # Text inside the prompt does not count.
    assert StopOnStrings(tok, ["推理"], prompt_width=ids.shape[1])(ids, None).tolist() == [False, False]
    assert (
        cut_at_stop_strings("该帖子的发布者有高自杀风险。推理：因为", ["推理", "Reasoning:"])
        == "该帖子的发布者有高自杀风险。"
    )


def test_stop_ids_by_name(tiny_hf_tokenizer):
    names = tiny_hf_tokenizer.convert_ids_to_tokens(stop_token_ids(tiny_hf_tokenizer))
    assert names == ["<|endoftext|>", "<|user|>", "<|observation|>"]


def test_works_on_peft_model(tiny_model, tiny_hf_tokenizer, prompts, unbatched):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(tiny_model, cfg)
    try:
        peft_model.train()
        # LoRA B starts at zero: the wrapped model must generate exactly what the base model does.
        assert generate(peft_model, tiny_hf_tokenizer, prompts, batch_size=4, max_new_tokens=12) == unbatched
        assert peft_model.training  # the caller's mode is restored
    finally:
        peft_model.eval()
        peft_model.unload()  # leave the session-scoped base model as it was
