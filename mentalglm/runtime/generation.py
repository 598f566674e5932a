"""Batched greedy generation: left padding, length-sorted batches, GLM-4 stop ids, optional stop strings.

Sorting prompts by length makes batches nearly pad-free and is where most of the speed-up over batch-1
generation comes from (benchmarks/README.md); `generate` returns results in the input order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

GLM4_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def stop_token_ids(tokenizer) -> list[int]:
    """GLM-4's three stop ids looked up by name (those the tokenizer has), else the tokenizer's eos."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in GLM4_STOP_TOKENS if t in vocab]
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


class StopOnStrings(StoppingCriteria):
    """Per-row stop once the generated text (after `prompt_width`) contains any of `stop_strings`.

    Decodes only a tail window long enough to hold the longest stop string (a byte-level token holds at
    least one byte), so the cost per step stays constant.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.prompt_width = prompt_width
        self.window = max(len(s.encode("utf-8")) for s in self.stop_strings) + 2

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tail = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.window) :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        done = [any(s in t for s in self.stop_strings) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Text before the first stop string (a token may overshoot it; batch and batch-1 then agree)."""
    cut = len(text)
    for s in stop_strings:
        if s and (i := text.find(s)) >= 0:
            cut = min(cut, i)
    return text[:cut]


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        attention_mask[row, width - len(p) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_pad_fraction: float | None = None, sort_by_length: bool = True
) -> list[list[int]]:
    """Generation batches of item indices: longest first (an out-of-memory shows up on the first batch, not at
    the end), at most `batch_size` long, and with `max_pad_fraction` a prompt shorter than (1 - it) x its batch's
    longest starts a new batch, so a split's few long prompts do not pad short ones (worth it for label-only
    answers, whose compute is mostly the prompts). The one place generation batches are composed: evaluation
    loaders and `generate` both use it."""
    order = list(range(len(lengths)))
    if sort_by_length:
        order.sort(key=lambda i: (-lengths[i], i))
    else:
        max_pad_fraction = None
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if (
            current is None
            or len(current) == batch_size
            or (max_pad_fraction is not None and lengths[i] < (1 - max_pad_fraction) * lengths[current[0]])
        ):
            batches.append([i])
        else:
            current.append(i)
    return batches


def generation_config(tokenizer, max_new_tokens: int) -> GenerationConfig:
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    # A fresh config: the checkpoint's own (GLM-4-chat: do_sample, temperature 0.8, top_p 0.8) must not leak in.
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=stops,
        pad_token_id=pad_id,
    )


def generate_batch(
    model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 64, stop_strings: Sequence[str] = ()
) -> list[str]:
    """Greedy continuations of one batch of prompts (token ids), left-padded together as given, decoded without
    special tokens, cut before the first stop string and stripped. Works on plain and peft-wrapped models."""
    return [text for text, _ in generate_batch_capped(model, tokenizer, prompts, max_new_tokens, stop_strings)]


@torch.inference_mode()
def generate_batch_capped(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop_strings: Sequence[str] = ()
) -> list[tuple[str, bool]]:
    """`generate_batch`'s texts, each with whether the token cap cut it (max_new_tokens reached with no stop token
    and no stop string): an answer cut before its label sentence ends must not be read as a full one."""
    if not prompts:
        return []
    config = generation_config(tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        input_ids, attention_mask = _left_pad(prompts, config.pad_token_id, device)
        criteria = StoppingCriteriaList()
        if any(stop_strings):
            criteria.append(StopOnStrings(tokenizer, stop_strings, input_ids.shape[1]))
        # synced_gpus=False: transformers turns it on for FSDP-managed models, all-reducing every step so
        # ranks finish together; here each rank generates on its own (runtime/distributed.gathered_for_generation).
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            stopping_criteria=criteria,
            synced_gpus=False,
        )
        new = out[:, input_ids.shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        ends = torch.tensor(sorted({*config.eos_token_id, config.pad_token_id}), device=new.device)
        stopped = torch.isin(new, ends).any(dim=1).tolist()
    finally:
        model.train(was_training)
    out_rows = []
    for text, ended in zip(texts, stopped):
        cut = cut_at_stop_strings(text, stop_strings)
        capped = new.shape[1] >= max_new_tokens and not ended and len(cut) == len(text)
        out_rows.append((cut.strip(), capped))
    return out_rows


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    stop_strings: Sequence[str] = (),
    sort_by_length: bool = True,
    max_pad_fraction: float | None = None,
) -> list[str]:
    """Greedy continuations of any number of prompts, batched by `plan_batches`, in the input order."""
    results: list[str] = [""] * len(prompts)
    for rows in plan_batches([len(p) for p in prompts], batch_size, max_pad_fraction, sort_by_length):
        texts = generate_batch(
            model, tokenizer, [prompts[i] for i in rows], max_new_tokens=max_new_tokens, stop_strings=stop_strings
        )
        for i, text in zip(rows, texts):
            results[i] = text
    return results


# ----------------------------------------------------------------------------- rows of a serving batch
@dataclass(frozen=True)
class Sampling:
    """How one serving row picks its tokens (the OpenAI parameters). The default is greedy; penalties apply to
    greedy rows too, as OpenAI defines them (on the logits, before the choice)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): every token
    seed: int | None = None  # None: a fresh random seed
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.presence_penalty == 0 and self.frequency_penalty == 0


GREEDY = Sampling()


@dataclass
class RowRequest:
    """One request of a serving batch: its own token cap, stop strings, sampling, streamed text and cancellation."""

    prompt: list[int]
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None  # each new piece of the answer, as soon as it is final
    cancelled: Callable[[], bool] = lambda: False  # true: stop generating this row (client gone, timed out)
    sampling: Sampling = GREEDY
    ignore_eos: bool = False  # go on past the end token to the cap (vLLM's extension: load tests, benchmarks)
    # The LoRA adapter that generates it (several served by one base): its name, None for the base without
    # adapters, "" for the model as it stands.
    adapter: str | None = ""
    logprobs: int | None = None  # record each token's log-probability and this many top alternatives (None: off)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log-probability under the model's own distribution (before temperature, penalties
    and top-k/p, as vLLM reports by default) and the most likely alternatives at its position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class RowResult:
    """One row's answer, the tokens generated for it (the end token not counted) and why it ended: `length`
    exactly when its token cap cut it, else `stop` (end token, stop string or cancellation); `logprobs` per
    generated token when the row asked for them."""

    text: str
    tokens: int
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] | None = None


class RowLogprobs(LogitsProcessor):
    """First in the processor list: keeps, for each row asking for logprobs, the log-softmax of the raw logits of
    the step before, and once the next step shows which token was chosen, that token's log-probability and the
    top alternatives (a token's choice is only seen a step later; `finish` reads the last one)."""

    def __init__(self, tokenizer, rows: list[RowRequest]):
        self.tokenizer, self.rows = tokenizer, rows
        self.previous: list[torch.Tensor | None] = [None] * len(rows)
        self.recorded: list[list[TokenLogprob]] = [[] for _ in rows]

    def _resolve(self, i: int, token: int) -> None:
        logprobs, k = self.previous[i], self.rows[i].logprobs or 0
        top = ()
        if k:
            values, ids = torch.topk(logprobs, k)
            top = tuple((self.tokenizer.decode([t]), float(v)) for t, v in zip(ids.tolist(), values.tolist()))
        self.recorded[i].append(TokenLogprob(self.tokenizer.decode([token]), float(logprobs[token]), top))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            if row.logprobs is None:
                continue
            if self.previous[i] is not None:
                self._resolve(i, int(input_ids[i, -1]))
            self.previous[i] = torch.log_softmax(scores[i].float(), dim=-1)
        return scores

    def finish(self, i: int, generated: list[int], tokens: int) -> tuple[TokenLogprob, ...] | None:
        """Row i's logprobs for its first `tokens` generated tokens."""
        if self.rows[i].logprobs is None:
            return None
        if len(self.recorded[i]) < len(generated) and self.previous[i] is not None:
            self._resolve(i, generated[len(self.recorded[i])])
        return tuple(self.recorded[i][:tokens])


class RowSampler(LogitsProcessor):
    """Each sampled row draws its token from its own seeded generator (temperature, top-k, top-p, penalties
    applied to its logits) and leaves only that token for `generate`'s greedy pick: a row's answer depends on its
    seed alone, not on the rows it shares a batch with. Greedy rows pass through unchanged."""

    def __init__(self, rows: list[RowRequest], prompt_width: int, device):
        self.rows, self.prompt_width = rows, prompt_width
        self.generators: list[torch.Generator | None] = []
        for row in rows:
            gen = None
            if row.sampling.temperature > 0:
                seed = row.sampling.seed if row.sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
                gen = torch.Generator(device=device).manual_seed(seed % 2**63)
            self.generators.append(gen)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            s = row.sampling
            if s.greedy:
                continue
            logits = scores[i].float()
            if s.presence_penalty or s.frequency_penalty:
                counts = torch.bincount(input_ids[i, self.prompt_width :], minlength=logits.shape[0])[: logits.shape[0]]
                logits = logits - s.frequency_penalty * counts - s.presence_penalty * (counts > 0)
            if s.temperature > 0:
                token = self._draw(logits / s.temperature, s, self.generators[i])
                logits = torch.full_like(logits, float("-inf"))
                logits[token] = 0.0
            scores[i] = logits.to(scores.dtype)
        return scores

    @staticmethod
    def _draw(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
        if 0 < s.top_k < logits.shape[0]:
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            before = probs.cumsum(-1) - probs
            logits = logits.clone()
            logits[order[before >= s.top_p]] = float("-inf")  # keep the smallest set reaching top_p
        return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing characters might still change: a partly decoded character, or the start of a stop
    string (streamed text never shows what the final answer cuts)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


class RowControl(StoppingCriteria):
    """Called by `generate` after every token: streams each row's new text, and finishes a row at its own cap,
    its stop strings, its end token or its cancellation, so requests of different lengths share a batch and
    each gets the answer it would get alone."""

    def __init__(self, tokenizer, rows: list[RowRequest], prompt_width: int):
        self.tokenizer, self.rows, self.prompt_width = tokenizer, rows, prompt_width
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.sent = [""] * len(rows)
        self.results: list[RowResult | None] = [None] * len(rows)

    def _emit(self, i: int, text: str) -> None:
        delta = text[len(self.sent[i]) :] if text.startswith(self.sent[i]) else ""
        if delta and self.rows[i].on_text is not None:
            self.rows[i].on_text(delta)
        self.sent[i] += delta

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = []
        for i in range(len(self.rows)):
            if self.results[i] is None:
                self.step(i, input_ids[i, self.prompt_width :].tolist())
            done.append(self.results[i] is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def step(self, i: int, ids: list[int], last: bool = False) -> None:
        """Row i after its newest token: finished (result set) or its settled text streamed."""
        row = self.rows[i]
        end = None if row.ignore_eos else next((k for k, t in enumerate(ids) if t in self.stop_ids), None)
        ids = (ids if end is None else ids[:end])[: row.max_new_tokens]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        stopped = end is not None or cut_at_stop_strings(text, row.stop_strings) != text
        if stopped or len(ids) >= row.max_new_tokens or row.cancelled() or last:
            final = cut_at_stop_strings(text, row.stop_strings).strip()
            self._emit(i, final)
            reason = "length" if len(ids) >= row.max_new_tokens and not stopped else "stop"
            self.results[i] = RowResult(final, len(ids), reason)
        else:
            keep = text.lstrip()
            self._emit(i, keep[: len(keep) - _held_back(keep, row.stop_strings)].rstrip())


@torch.inference_mode()
def generate_rows(model, tokenizer, rows: list[RowRequest]) -> list[RowResult]:
    """The answers of one serving batch (each row capped, stopped, sampled and streamed on its own), in row order;
    a greedy row's text equals what `generate_batch` gives it alone."""
    if not rows:
        return []
    config = generation_config(tokenizer, max(r.max_new_tokens for r in rows))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        input_ids, attention_mask = _left_pad([r.prompt for r in rows], config.pad_token_id, device)
        width = input_ids.shape[1]
        if any(r.ignore_eos for r in rows):
            config.eos_token_id = []  # RowControl ends the other rows at their end token (None: the model default)
        control = RowControl(tokenizer, rows, width)
        recorder = RowLogprobs(tokenizer, rows) if any(r.logprobs is not None for r in rows) else None
        processors = [] if recorder is None else [recorder]
        processors += [] if all(r.sampling.greedy for r in rows) else [RowSampler(rows, width, device)]
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([control]),
            synced_gpus=False,
        )
    finally:
        model.train(was_training)
    generated = out[:, width:].tolist()
    for i in range(len(rows)):
        if control.results[i] is None:  # generate stopped at its own cap before the row's last check
            control.step(i, generated[i], last=True)
    if recorder is None:
        return list(control.results)
    return [replace(r, logprobs=recorder.finish(i, generated[i], r.tokens)) for i, r in enumerate(control.results)]
