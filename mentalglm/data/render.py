"""Records -> token ids: prompt rendering, answer masking, post-only truncation, cached dataset tokenization.

Chat models go through the tokenizer's own chat template; base models through a plain text template
with the tokenizer's auto-prefix (GLM-4-hf: `[gMASK]<sop>`, Llama: `<s>`) exactly once. The loss covers
the answer plus one end token only. Truncation never touches the question or the answer: it cuts the post
(`query[post_start:post_end]`) at a token boundary and re-renders until the example fits.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the map runs on the dataset it is given: token ids alone need no `datasets` (GPU check)
    import datasets

IGNORE_INDEX = -100
DEFAULT_BASE_TEMPLATE = "{query}\n"
# Bump when rendering changes, so cached tokenized datasets are not reused.
RENDER_VERSION = 2
# Record columns carried through tokenization and into generation batches (gold `labels` becomes
# `label_names` when the token `labels` column takes its name, i.e. for training data).
META_COLUMNS = ("task", "id", "labels", "aspect")


def _messages(query: str, system: str | None, answer: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": query})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    # transformers 5 returns a BatchEncoding unless return_dict=False.
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
    )


def auto_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before plain text on its own (`[gMASK]<sop>` for GLM-4-hf, `<s>` for Llama)."""
    full = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i])
    return []


def plain_ids(tokenizer, text: str) -> list[int]:
    """Plain text with the auto-prefix exactly once, and no auto-suffix (an eos would end the prompt)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prefix = auto_prefix(tokenizer)
    if prefix and ids[: len(prefix)] == prefix:  # the template already wrote the prefix out
        return ids
    return prefix + ids


def _end_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token to end the answer with")
    return tokenizer.eos_token_id


def render_prompt(
    tokenizer, query: str, *, chat: bool, base_template: str = DEFAULT_BASE_TEMPLATE, system: str | None = None
) -> list[int]:
    """Prompt ids a model continues with the answer (chat: ends with `<|assistant|>` for GLM-4)."""
    if chat:
        return chat_ids(tokenizer, _messages(query, system), add_generation_prompt=True)
    text = base_template.replace("{query}", query)
    if system:
        text = f"{system}\n{text}"
    return plain_ids(tokenizer, text)


def _render(tokenizer, query: str, answer: str | None, *, chat, base_template, system) -> tuple[list[int], list[int]]:
    """(prompt ids, supervised answer ids incl. the end token; [] without an answer)."""
    prompt = render_prompt(tokenizer, query, chat=chat, base_template=base_template, system=system)
    if answer is None:
        return prompt, []
    end = _end_id(tokenizer)
    if chat:
        # Render the whole conversation so the ids are exactly what the template produces; everything
        # after the generation prompt (GLM-4: "\n" + answer) is the answer part.
        full = chat_ids(tokenizer, _messages(query, system, answer), add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise ValueError("chat template: the generation prompt is not a prefix of the rendered conversation")
        answer_ids = full[len(prompt) :]
    else:
        answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    # One end token so the model learns to stop; templates with an end-of-turn token already wrote it.
    if not answer_ids or answer_ids[-1] not in tokenizer.all_special_ids:
        answer_ids.append(end)
    return prompt, answer_ids


def encode_example(
    tokenizer,
    record: dict,
    *,
    chat: bool,
    max_length: int = 1024,
    base_template: str = DEFAULT_BASE_TEMPLATE,
    system: str | None = None,
    with_answer: bool = True,
) -> dict:
    """Render one record; without the answer (generation prompts) `labels` is empty.

    Raises ValueError (naming the record id) when it cannot fit in `max_length` by cutting the post.
    """
    query = record["query"]
    answer = record["answer"] if with_answer else None
    opts = dict(chat=chat, base_template=base_template, system=system)
    prompt, answer_ids = _render(tokenizer, query, answer, **opts)
    truncated = False
    if len(prompt) + len(answer_ids) > max_length:
        prompt, answer_ids = _truncate_post(tokenizer, record, answer, max_length, len(prompt) + len(answer_ids), opts)
        truncated = True
    labels = [IGNORE_INDEX] * len(prompt) + answer_ids if with_answer else []
    return {"input_ids": prompt + answer_ids, "labels": labels, "prompt_length": len(prompt), "truncated": truncated}


def _truncate_post(tokenizer, record: dict, answer: str | None, max_length: int, total: int, opts: dict):
    query, rid = record["query"], record.get("id")
    start, end = record.get("post_start", -1), record.get("post_end", -1)
    if start is None or end is None or start < 0 or end < start:
        raise ValueError(f"record {rid!r} is longer than max_length={max_length} and has no post span to truncate")
    head, post, tail = query[:start], query[start:end], query[end:]
    # Char offset where each post token ends: cutting there keeps whole tokens (and whole characters).
    cuts = [e for _, e in tokenizer(post, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    keep = len(cuts)
    while total > max_length:
        if keep == 0:
            raise ValueError(f"record {rid!r} does not fit in max_length={max_length} even with an empty post")
        # The post re-tokenizes slightly differently in context, hence the loop; it drops >= 1 token a turn.
        keep = max(keep - (total - max_length), 0)
        kept = post[: cuts[keep - 1]] if keep else ""
        prompt, answer_ids = _render(tokenizer, head + kept + tail, answer, **opts)
        total = len(prompt) + len(answer_ids)
    return prompt, answer_ids


# ----------------------------------------------------------------------------- datasets


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything in the tokenizer that changes ids: vocabulary, merges, normalisation, template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(repr(tokenizer.all_special_tokens).encode())
    return h.hexdigest()[:16]


def _encode_batch(batch: dict, *, tokenizer, chat, max_length, base_template, system, with_answer) -> dict:
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "prompt_length", "truncated", "length")}
    if not with_answer:
        out.pop("labels")
        out["answer"] = []
    meta = [c for c in (*META_COLUMNS, "index") if c in batch]  # index: the position in the full split
    for c in meta:
        out[_meta_name(c, with_answer)] = []
    n = len(batch["query"])
    for i in range(n):
        record = {k: v[i] for k, v in batch.items()}
        try:
            enc = encode_example(
                tokenizer,
                record,
                chat=chat,
                max_length=max_length,
                base_template=base_template,
                system=system,
                with_answer=with_answer,
            )
        except ValueError:
            continue  # counted by the caller as too long (output has fewer rows than input)
        out["input_ids"].append(enc["input_ids"])
        if with_answer:
            out["labels"].append(enc["labels"])
        else:
            out["answer"].append(record.get("answer", ""))
        out["prompt_length"].append(enc["prompt_length"])
        out["truncated"].append(enc["truncated"])
        out["length"].append(len(enc["input_ids"]))
        for c in meta:
            out[_meta_name(c, with_answer)].append(record[c])
    return out


def _meta_name(column: str, with_answer: bool) -> str:
    return "label_names" if (column == "labels" and with_answer) else column


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer,
    *,
    chat: bool,
    max_length: int,
    base_template: str = DEFAULT_BASE_TEMPLATE,
    system: str | None = None,
    with_answer: bool = True,
    cache_dir: Path | None = None,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Tokenize records, cached on disk by (dataset, tokenizer, render options).

    Output columns: input_ids, prompt_length, truncated, length, task, id, aspect, and
    - with_answer=True (training): token `labels` (-100 on the prompt), gold label names as `label_names`;
    - with_answer=False (generation): gold `labels` (names) and `answer`, no token labels.
    Records that cannot fit are dropped and counted in stats["n_too_long"].
    """
    t0 = time.perf_counter()
    options = dict(
        chat=chat,
        max_length=max_length,
        base_template=base_template,
        system=system,
        with_answer=with_answer,
        v=RENDER_VERSION,
    )
    key = json.dumps([ds._fingerprint, tokenizer_fingerprint(tokenizer), options], sort_keys=True)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache_file = None
    cache_hit = False
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = cache_dir / f"tokenized-{fingerprint}.arrow"
        # datasets names per-process shards `<name>_00000_of_00004.arrow`.
        cache_hit = any(cache_dir.glob(f"tokenized-{fingerprint}*.arrow"))
    out = ds.map(
        _encode_batch,
        batched=True,
        batch_size=256,
        fn_kwargs=dict(
            tokenizer=tokenizer,
            chat=chat,
            max_length=max_length,
            base_template=base_template,
            system=system,
            with_answer=with_answer,
        ),
        remove_columns=ds.column_names,
        new_fingerprint=fingerprint,  # hashing the tokenizer through fn_kwargs is slow and unstable
        cache_file_name=str(cache_file) if cache_file else None,
        load_from_cache_file=True,
        num_proc=num_proc if num_proc and num_proc > 1 and len(ds) > 1 else None,
        desc="tokenize",
    )
    stats = {
        "n": len(ds),
        "n_truncated": int(sum(out["truncated"])) if len(out) else 0,
        "n_too_long": len(ds) - len(out),
        "real_tokens": int(sum(out["length"])) if len(out) else 0,
        "seconds": time.perf_counter() - t0,
        "cache_hit": cache_hit,
    }
    return out, stats
