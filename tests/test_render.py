import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mentalglm.data.render import IGNORE_INDEX, auto_prefix, encode_example, render_prompt, tokenize_dataset
from mentalglm.tasks import TASKS


def make_record(post: str, label: str = "高自杀风险", task: str = "sos_hl_1k", rid: str = "r0") -> dict:
    t = TASKS[task]
    query, start, end = t.format_query(post)
    return {
        "task": task,
        "id": rid,
        "query": query,
        "answer": t.format_answer([label]),
        "labels": [label],
        "aspect": "",
        "post_start": start,
        "post_end": end,
    }


def chat_ids(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def gmask(tok):
    return tok.convert_tokens_to_ids("[gMASK]")


def test_chat_ids_equal_apply_chat_template_plus_end_token(tok):
    rec = make_record("最近压力很大，不想活了。")
    enc = encode_example(tok, rec, chat=True)
    convo = [{"role": "user", "content": rec["query"]}, {"role": "assistant", "content": rec["answer"]}]
    assert enc["input_ids"] == chat_ids(tok, convo) + [tok.eos_token_id]
    prompt = chat_ids(tok, convo[:1], add_generation_prompt=True)
    assert enc["input_ids"][: enc["prompt_length"]] == prompt
    assert enc["input_ids"].count(gmask(tok)) == 1
    assert not enc["truncated"]


def test_labels_cover_only_answer_and_one_end_token(tok):
    rec = make_record("今天心情不好。")
    for chat in (True, False):
        enc = encode_example(tok, rec, chat=chat)
        n = enc["prompt_length"]
        assert enc["labels"][:n] == [IGNORE_INDEX] * n
        supervised = enc["labels"][n:]
        assert supervised == enc["input_ids"][n:] and IGNORE_INDEX not in supervised
        assert supervised[-1] == tok.eos_token_id and supervised.count(tok.eos_token_id) == 1
        text = tok.decode(supervised)
        assert text == ("\n" if chat else "") + rec["answer"] + "<|endoftext|>"


def test_render_prompt_chat_and_system(tok):
    ids = render_prompt(tok, "问题", chat=True, system="你是助手")
    assert tok.decode(ids) == "[gMASK]<sop><|system|>\n你是助手<|user|>\n问题<|assistant|>"


def test_base_template_adds_prefix_exactly_once(tok):
    ids = render_prompt(tok, "问题：高还是低？", chat=False)
    assert tok.decode(ids) == "[gMASK]<sop>问题：高还是低？\n"
    assert ids.count(gmask(tok)) == 1
    # A template that writes the prefix itself must not get a second one.
    ids = render_prompt(tok, "问题", chat=False, base_template="[gMASK]<sop>{query}\nAnswer:")
    assert ids.count(gmask(tok)) == 1 and tok.decode(ids) == "[gMASK]<sop>问题\nAnswer:"
    # Braces in the query are not format fields.
    assert tok.decode(render_prompt(tok, "a {b} c", chat=False)).endswith("a {b} c\n")


def _plain_bpe(post_processor=None) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import trainers

    bpe.train_from_iterator(
        ["hello world question"],
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    bpe.add_special_tokens(["<s>", "</s>"])
    if post_processor:
        bpe.post_processor = post_processor(bpe)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


def test_base_template_with_llama_style_and_prefixless_tokenizers():
    llama = _plain_bpe(
        lambda t: processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))])
    )
    bos = llama.convert_tokens_to_ids("<s>")
    assert auto_prefix(llama) == [bos]
    ids = render_prompt(llama, "hello", chat=False)
    assert ids[0] == bos and ids.count(bos) == 1
    enc = encode_example(
        llama, {"id": "x", "query": "hello", "answer": "world", "post_start": 0, "post_end": 5}, chat=False
    )
    assert enc["input_ids"].count(bos) == 1 and enc["input_ids"][-1] == llama.eos_token_id
    plain = _plain_bpe()
    assert auto_prefix(plain) == [] and render_prompt(plain, "hello", chat=False) == plain("hello\n")["input_ids"]


def test_truncation_cuts_only_the_post(tok):
    post = "我最近很累，不想活了，每天晚上都睡不着。" * 30
    rec = make_record(post)
    full = encode_example(tok, rec, chat=True, max_length=4096)
    assert not full["truncated"]
    empty = len(encode_example(tok, make_record(""), chat=True)["input_ids"])
    for max_length in (200, 80, empty + 3, empty):
        enc = encode_example(tok, rec, chat=True, max_length=max_length)
        assert enc["truncated"] and len(enc["input_ids"]) <= max_length
        # The answer part is untouched, the question intact, the post a prefix of the original.
        assert enc["input_ids"][enc["prompt_length"] :] == full["input_ids"][full["prompt_length"] :]
        text = tok.decode(enc["input_ids"][: enc["prompt_length"]], skip_special_tokens=True)
        head, _, rest = text.partition('考虑以下帖子："')
        kept_post, _, question = rest.partition('" 问题：')
        assert post.startswith(kept_post) and len(kept_post) < len(post)
        assert len(kept_post) > 0 or max_length == empty
        assert question == "这个帖子的发布者的自杀风险是高还是低？"
    # A tight budget is used well: within a few tokens of max_length.
    assert len(encode_example(tok, rec, chat=True, max_length=80)["input_ids"]) >= 76


def test_too_long_raises_with_record_id(tok):
    rec = make_record("不想活了。" * 50, rid="item-42")
    with pytest.raises(ValueError, match="item-42"):
        encode_example(tok, rec, chat=True, max_length=10)  # even an empty post does not fit
    no_span = dict(rec, post_start=-1, post_end=-1)
    with pytest.raises(ValueError, match="item-42.*no post span"):
        encode_example(tok, no_span, chat=True, max_length=100)


def test_generation_prompt_without_answer(tok):
    rec = make_record("今天心情不好。")
    enc = encode_example(tok, rec, chat=True, with_answer=False)
    assert enc["input_ids"] == render_prompt(tok, rec["query"], chat=True)
    assert enc["labels"] == [] and enc["prompt_length"] == len(enc["input_ids"])


def _records():
    recs = [
        make_record("今天心情不好。" * (1 + i % 3), label=("高自杀风险", "低自杀风险")[i % 2], rid=f"s{i}")
        for i in range(12)
    ]
    recs.append(make_record("我很累。" * 200, rid="long"))  # truncated
    recs.append(dict(make_record("我很累。" * 200, rid="nospan"), post_start=-1, post_end=-1))  # too long
    return datasets.Dataset.from_list(recs)


def test_tokenize_dataset_stats_columns_and_cache(tok, tmp_path):
    ds = _records()
    opts = dict(chat=True, max_length=128, base_template="{query}\n", system=None, cache_dir=tmp_path)
    train, stats = tokenize_dataset(ds, tok, with_answer=True, **opts)
    assert stats["n"] == 14 and stats["n_too_long"] == 1 and stats["n_truncated"] == 1
    assert not stats["cache_hit"]
    assert stats["real_tokens"] == sum(len(x) for x in train["input_ids"])
    assert {"input_ids", "labels", "prompt_length", "truncated", "task", "id", "aspect", "label_names"} <= set(
        train.column_names
    )
    assert "nospan" not in train["id"]
    row = train[0]
    assert row["input_ids"] == encode_example(tok, ds[0], chat=True, max_length=128)["input_ids"]
    assert row["label_names"] == ds[0]["labels"]

    again, stats2 = tokenize_dataset(ds, tok, with_answer=True, **opts)
    assert stats2["cache_hit"] and again["input_ids"] == train["input_ids"]
    assert stats2["n_truncated"] == 1 and stats2["n_too_long"] == 1

    # Different render options: a different cache entry.
    evalset, stats3 = tokenize_dataset(ds, tok, with_answer=False, **opts)
    assert not stats3["cache_hit"]
    assert evalset[0]["labels"] == ds[0]["labels"]  # gold label names, for the generation collator
    assert evalset[0]["input_ids"] == render_prompt(tok, ds[0]["query"], chat=True)


def test_the_task_description_goes_before_the_query_and_the_post_span_follows():
    from mentalglm.data.fewshot import add_descriptions

    post = "最近总是睡不着。"
    records = []
    for name in ("sos_hl_1k", "dr"):
        query, start, end = TASKS[name].format_query(post)
        records.append({"task": name, "query": query, "post_start": start, "post_end": end})
    sos, dr = add_descriptions(records, TASKS)
    assert sos["query"].startswith(TASKS["sos_hl_1k"].description.strip() + "\n\n")
    assert "低自杀风险：" in sos["query"] and sos["query"].endswith(records[0]["query"])
    assert dr["query"].startswith("Possible labels: no, yes\n\n")  # no description in the file: the label set
    assert all(r["query"][r["post_start"] : r["post_end"]] == post for r in (sos, dr))
