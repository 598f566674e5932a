"""An offline stand-in for GLM-4-9b-chat-hf: a GLM-4-like tokenizer and a tiny random `GlmForCausalLM`.

Tests, CI and the CPU smoke runs cannot download the 9B checkpoint. `ensure_tiny_checkpoint` writes a
directory that loads exactly like the hub one (`AutoTokenizer` / `AutoModelForCausalLM.from_pretrained`),
so the real loading, rendering and generation code paths run unchanged on it.

What is faithful to the real -hf checkpoint: special tokens by name (ids differ, like they would between
vocabularies), the chat template, the `[gMASK]<sop>` prefix added on plain `tokenizer(text)`, the three
stop ids, `<|endoftext|>` as pad/eos, the model class and its shape ratios (GQA, partial rotary 0.5,
q/k/v biases). What is not: vocabulary size and the weights (random).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

from mentalglm.fixtures import FIXTURES_DIR
from mentalglm.runtime.generation import GLM4_STOP_TOKENS, stop_token_ids  # noqa: F401 (re-exported)

# Bump when the builder changes in a way that changes the checkpoint (invalidates cached ones).
BUILDER_VERSION = 1

# GLM-4's special tokens, in the order the real tokenizer appends them after its BPE vocabulary.
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

# glm-4-9b-chat-hf's template without the tool-calling branch: `[gMASK]<sop>`, then `<|role|>` +
# metadata + `\n` + content per turn; the generation prompt ends at `<|assistant|>`.
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for item in messages %}"
    "{% if item['content'] %}"
    "<|{{ item['role'] }}|>{{ item['metadata'] if item['metadata'] is defined else '' }}\n{{ item['content'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CJK_PATTERN = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv", ".md")

# Used only while mentalglm/fixtures holds no text: enough Chinese and English that the common
# characters and words of the task templates get their own tokens.
_FALLBACK_CORPUS = """\
最近工作压力很大，每天晚上都睡不着，感觉自己什么都做不好。
我觉得生活没有意义，不想再继续下去了，活着太累了。
今天和朋友一起去公园散步，心情好多了，谢谢大家的关心。
考试又没考好，我就是一个失败者，以后也不会有什么出息。
他们一定都在背后说我坏话，我知道他们看不起我。
如果这次面试失败了，我的人生就彻底完了。
我应该每天都做到最好，不然就对不起父母。
都是我的错，要不是我，家里也不会变成这样。
都怪他，要不是他，我现在也不会这么痛苦。
虽然老师表扬了我，但那只是运气好而已，不算什么。
我感到很焦虑，所以这件事情一定很危险。
一次失败就说明我永远都做不成任何事情。
我一个人在家，没有人关心我，感觉非常孤独。
医生说我有抑郁症，需要按时吃药和休息。
我和家人的关系很紧张，经常吵架，不知道该怎么办。
学习和工作的事情太多了，我快要崩溃了。
最近身体不舒服，头疼失眠，情绪也很低落。
我想找个心理咨询师聊一聊，希望能好起来。
感谢你的帮助，我会努力让自己变得更好。
这个世界上没有人理解我，我只想一个人待着。
I have been feeling really down lately and I can't sleep at night.
My job is stressing me out, my boss keeps yelling at me and I might lose it.
I feel so lonely, nobody ever texts me back and I spend every weekend alone.
Had a great day with my family at the beach, feeling grateful.
I don't see the point of living anymore, everything feels hopeless.
Money problems are killing me, I can't pay rent this month.
My therapist says I should try to exercise more and talk to my friends.
School is overwhelming, I have three exams next week and I haven't studied.
I keep having flashbacks of the accident and I wake up screaming.
My parents fight all the time and I don't know what to do.
"""


def _strings(obj) -> Iterable[str]:
    """Every string value inside parsed JSON (so escaped CJK in .json files is seen as characters)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _read_fixture(path: Path) -> Iterable[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            yield from _strings(json.loads(text))
            return
        except json.JSONDecodeError:
            pass
    if path.suffix == ".jsonl":
        for line in text.splitlines():
            try:
                yield from _strings(json.loads(line))
            except json.JSONDecodeError:
                yield line
        return
    yield text


# The tokenizer is trained on these tasks' fixtures and templates only: a task added later (to the package or a
# user's) leaves the tiny checkpoint, hence the demo's figures, unchanged; its text still tokenizes byte-wise.
CORPUS_TASKS = (
    "sos_hl_1k",
    "socialcd_3k",
    "cp",
    "dr",
    "dreaddit",
    "loneliness",
    "swmh",
    "t_sid",
    "sad",
    "cams",
    "multiwd",
    "irf",
)
CORPUS_DIRS = (
    "sos_hl_1k",
    "socialcd_3k",
    "cp",
    "instructions",
    "imhi/complete",
    *(f"imhi/{t}" for t in CORPUS_TASKS[3:]),
)


def _template_texts() -> list[str]:
    from mentalglm.tasks import TASKS

    texts = []
    for task in (TASKS[name] for name in CORPUS_TASKS):
        texts += [task.query_template, task.answer_template, task.explanation_marker, *task.labels]
        texts += list(task.label_sentences.values()) + list(task.aspects)
        texts += [alias for aliases in task.aliases.values() for alias in aliases]
        # A few rendered answers so label sentences with joined labels appear as whole strings.
        if task.answer_template:
            texts += [task.format_answer([lab]) for lab in task.labels]
    return [t for t in texts if t]


def default_corpus() -> list[str]:
    """The corpus tasks' fixture texts (sorted by path, for determinism) plus their templates."""
    texts: list[str] = []
    files = (p for d in CORPUS_DIRS if (FIXTURES_DIR / d).is_dir() for p in (FIXTURES_DIR / d).iterdir())
    for path in sorted(p for p in files if p.is_file() and p.suffix in TEXT_SUFFIXES):
        texts += list(_read_fixture(path))
    if not texts:
        texts = _FALLBACK_CORPUS.splitlines()
    return texts + _template_texts()


def build_tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 4000) -> PreTrainedTokenizerFast:
    """A byte-level BPE with GLM-4's special tokens, chat template and `[gMASK]<sop>` auto-prefix."""
    texts = list(default_corpus() if corpus is None else corpus)
    tok = Tokenizer(models.BPE())
    # Each CJK character is its own pre-token, so merges build whole characters (a common character
    # is one token) instead of gluing whole sentences of a small corpus into single tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CJK_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(GLM4_SPECIAL_TOKENS),
        min_frequency=1,  # rare CJK characters in a small corpus still become whole tokens
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Appended after the BPE vocabulary like the real tokenizer, so code cannot get away with fixed ids.
    tok.add_special_tokens(list(GLM4_SPECIAL_TOKENS))
    gmask, sop = tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")
    # The -hf tokenizer prefixes plain `tokenizer(text)` with `[gMASK]<sop>`: rendering code must cope.
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B", special_tokens=[("[gMASK]", gmask), ("<sop>", sop)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in GLM4_SPECIAL_TOKENS if t != "<|endoftext|>"],
        padding_side="left",  # as in glm-4-9b-chat-hf's tokenizer_config
        clean_up_tokenization_spaces=False,
        model_max_length=128000,
    )
    tokenizer.chat_template = GLM4_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    initializer_range: float = 0.1,
    seed: int = 0,
) -> GlmForCausalLM:
    """A random `GlmForCausalLM` with GLM-4's architecture at toy size.

    `initializer_range` defaults to 5x GLM-4's 0.02: with 0.02 a toy-sized model's logits are nearly
    uniform and input-independent, and LoRA alone barely moves it. Measured recipe
    (fixtures, 200 steps, batch 16, ~11 s on 2 CPU cores): hidden 128, 2 layers, init 0.1, LoRA r=16
    alpha=32 on q/k/v/o/gate_up/down, lr 5e-3 -> loss 7.1 -> 0.08, label accuracy far above majority.
    """
    stops = stop_token_ids(tokenizer)
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = GlmForCausalLM(config)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    return model


def _checkpoint_key(sizes: dict, vocab_size: int, corpus: list[str]) -> str:
    h = hashlib.sha256(json.dumps({"v": BUILDER_VERSION, "sizes": sizes, "vocab": vocab_size}, sort_keys=True).encode())
    for text in corpus:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:12]


def ensure_tiny_checkpoint(
    cache_dir: Path, *, corpus: Iterable[str] | None = None, vocab_size: int = 4000, **sizes
) -> Path:
    """Build the tiny tokenizer + model once and save both like a hub checkpoint; return its directory.

    `sizes` are `build_tiny_model` keyword arguments. Written to a temp dir and renamed into place, so
    concurrent processes (pytest-xdist, DDP ranks, sweeps) never load half a checkpoint.
    """
    cache_dir = Path(cache_dir)
    texts = list(default_corpus() if corpus is None else corpus)
    target = cache_dir / f"tiny_glm-{_checkpoint_key(sizes, vocab_size, texts)}"

    def build(tmp: Path) -> None:
        tokenizer = build_tiny_tokenizer(texts, vocab_size=vocab_size)
        build_tiny_model(tokenizer, **sizes).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_once(target, build)


def build_once(target: Path, build) -> Path:
    """`target`, built by `build(tmp)` into a temporary directory renamed into place unless it exists: concurrent
    processes (pytest-xdist, DDP ranks, sweeps) never load half a checkpoint."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its checkpoint is identical.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
