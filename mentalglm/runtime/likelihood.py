"""Label likelihoods: each candidate label sentence of a task scored by its log-likelihood given the prompt.

The prompts of a batch run once (`SharedPrompts`); a piece every candidate of an item shares (the label sentence's
fixed start, the label list so far) is run once more on top of that cache (`extend`); then all candidates of an
item go in one row, a 4-D mask letting each see the prompt and its own earlier tokens only, with positions that
continue the prompt's, so each is scored as if it followed the prompt alone (`score`). Two ways to turn
log-likelihoods into label probabilities:

- single-label tasks (binary, multiclass): the softmax over the label sentences the model was trained to write
  first (`该帖子的发布者有高自杀风险。`, `Yes, the poster suffers from depression.`).
- multi-label and hierarchical tasks list their labels in the task's order after a fixed prefix
  (`该帖子体现的认知歪曲：`). Label l is in the answer exactly when, after the labels before it that are in the
  answer, the next item is l, so P(l) = P(l | list so far) (for a label that begins another label, such as CP's
  parents: P(l + joiner | list so far) + P(l + closing text | list so far)).
  Walking the labels in order and taking those with P > 0.5 into the list gives each label's probability
  (exact given the decisions on the labels before it) and the predicted set.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mentalglm.data.render import _render
from mentalglm.runtime.generation import _left_pad, stop_token_ids
from mentalglm.tasks import SINGLE_LABEL_KINDS, Task

# Candidate positions per forward: bounds the [positions, vocabulary] logits (GLM-4: 151,552 ids, 0.6 MB each).
MAX_POSITIONS = 2048


def continuation_ids(tokenizer, text: str, *, chat: bool, system: str | None = None) -> list[int]:
    """The ids of `text` as the start of an answer, as training renders answers (no end token)."""
    if not chat:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    _, ids = _render(tokenizer, "x", text, chat=True, base_template="{query}", system=system)
    special = set(tokenizer.all_special_ids)
    while ids and ids[-1] in special:
        ids = ids[:-1]
    return ids


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids(tokenizer)[0]


def _cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x: the name this model's forward takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_rows(cache, rows: torch.Tensor):
    """A cache holding `rows` of `cache`'s batch, `cache` itself untouched (its layers are copied shallowly;
    selecting rows makes new tensors)."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    return selected


class SharedPrompts:
    """One forward over a batch of prompts (left-padded); then any number of `score` calls, each scoring
    continuations of those prompts against the prompts' KV cache."""

    @torch.inference_mode()
    def __init__(self, model, prompts: Sequence[Sequence[int]], pad_id: int, max_positions: int = MAX_POSITIONS):
        self.model, self.pad_id, self.max_positions = model, pad_id, max_positions
        self.device = next(model.parameters()).device
        input_ids, self.mask = _left_pad([list(p) for p in prompts], pad_id, self.device)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=input_ids, attention_mask=self.mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        self.first_logprobs = out.logits[:, -1].float().log_softmax(-1)
        self.cache_argument = _cache_argument(model)
        self.cache = out[self.cache_argument]
        self.lengths = self.mask.sum(-1)
        self.n_items = len(prompts)
        self.slot = list(range(self.n_items))  # item -> its row in the cache (None: not held)

    @torch.inference_mode()
    def extend(self, continuations: Sequence[Sequence[int]], items: Sequence[int] | None = None) -> SharedPrompts:
        """Prompts continued by one piece each that all their candidates share (e.g. the answer's fixed start): a
        new object holding `items` (default: those given a piece), its cache prompt + piece; this one is left as
        it is."""
        items = [i for i, c in enumerate(continuations) if c] if items is None else list(items)
        if not any(continuations[i] for i in items):
            return self
        width = max(len(continuations[i]) for i in items)
        rows = torch.as_tensor([self.slot[i] for i in items], device=self.device)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long, device=self.device)
        real = torch.zeros((len(items), width), dtype=torch.long, device=self.device)
        for r, i in enumerate(items):
            ids[r, : len(continuations[i])] = torch.as_tensor(list(continuations[i]), dtype=torch.long)
            real[r, : len(continuations[i])] = 1
        mask, lengths = self.mask[rows], self.lengths[rows]
        out = self.model(
            input_ids=ids,
            attention_mask=torch.cat([mask, torch.ones_like(real)], dim=-1),
            position_ids=lengths[:, None] + torch.arange(width, device=self.device),
            use_cache=True,
            **{self.cache_argument: _cache_rows(self.cache, rows)},
        )
        # Only the items given a piece are held (rows in their order); the others cannot be scored on the result.
        grown = copy.copy(self)
        grown.cache = out[self.cache_argument]
        grown.mask = torch.cat([mask, real], dim=-1)  # a shorter piece's pads stay invisible to what follows
        ends = (real.sum(-1) - 1).clamp(min=0)
        last = out.logits[torch.arange(len(items), device=self.device), ends].float().log_softmax(-1)
        grown.first_logprobs = torch.where(real.sum(-1, keepdim=True) > 0, last, self.first_logprobs[rows])
        grown.lengths = lengths + real.sum(-1)
        grown.slot = [None] * self.n_items
        for r, i in enumerate(items):
            grown.slot[i] = r
        return grown

    @torch.inference_mode()
    def score(self, continuations: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
        """Sum of token log-probabilities of each continuation of each prompt ([prompt][candidate])."""
        owners = [i for i, cands in enumerate(continuations) if any(cands)]
        out = [[0.0] * len(cands) for cands in continuations]
        batch: list[int] = []
        width = 0
        for i in owners:
            row_width = sum(len(c) for c in continuations[i])
            if batch and (len(batch) + 1) * max(width, row_width) > self.max_positions:
                self._score_packed(batch, continuations, out)
                batch, width = [], 0
            batch.append(i)
            width = max(width, row_width)
        if batch:
            self._score_packed(batch, continuations, out)
        return out

    def _score_packed(self, owners: list[int], continuations, out: list[list[float]]) -> None:
        """One row per prompt holding all its candidates one after another; a 4-D mask lets each candidate see the
        prompt and its own earlier tokens only, and its positions continue the prompt's, so each scores as if it
        were alone after the prompt. The prompt's cache is reused once per row, not once per candidate."""
        n, prompt_width = len(owners), self.mask.shape[1]
        slots = [self.slot[i] for i in owners]
        if None in slots:
            raise ValueError("scoring an item this extended prompt batch does not hold")
        width = max(sum(len(c) for c in continuations[i]) for i in owners)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        allowed = torch.zeros((n, width, prompt_width + width), dtype=torch.bool)
        allowed[:, :, :prompt_width] = self.mask[slots].bool().cpu()[:, None, :]
        lengths = self.lengths[slots].cpu()
        spans = []  # (row, candidate index, start, length)
        for r, i in enumerate(owners):
            offset = 0
            for k, c in enumerate(continuations[i]):
                if c:
                    ids[r, offset : offset + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
                    positions[r, offset : offset + len(c)] = lengths[r] + torch.arange(len(c))
                    block = torch.ones(len(c), len(c), dtype=torch.bool).tril()
                    allowed[r, offset : offset + len(c), prompt_width + offset : prompt_width + offset + len(c)] = block
                    spans.append((r, k, offset, len(c)))
                offset += len(c)
        rows = torch.as_tensor(slots, device=self.device)
        logits = self.model(
            input_ids=ids.to(self.device),
            attention_mask=allowed[:, None].to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **{self.cache_argument: _cache_rows(self.cache, rows)},
        ).logits
        logp = logits.float().log_softmax(-1)
        first = self.first_logprobs[rows].gather(1, ids[:, :1].to(self.device)).squeeze(1)
        for r, k, start, length in spans:
            i = owners[r]
            total = first[r] if start == 0 else self.first_logprobs[slots[r], ids[r, start]]
            if length > 1:
                tokens = ids[r, start + 1 : start + length].to(self.device)
                total = total + logp[r, start : start + length - 1].gather(1, tokens[:, None]).sum()
            out[i][k] = float(total)


@dataclass
class LabelScores:
    """One item's label probabilities (`probs`: label -> P) and the labels they predict."""

    probs: dict[str, float]
    labels: list[str]


class LabelScorer:
    """Label probabilities of a batch of prompts, for any of `tasks` (candidate ids are built once per task)."""

    def __init__(self, tokenizer, tasks: Mapping[str, Task], *, chat: bool, system: str | None = None):
        self.tokenizer, self.tasks, self.chat, self.system = tokenizer, dict(tasks), chat, system
        self._ids: dict[str, list[int]] = {}
        self._tail_cache: dict[tuple[str, str], tuple[str, ...]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = continuation_ids(self.tokenizer, text, chat=self.chat, system=self.system)
        return self._ids[text]

    @torch.inference_mode()
    def __call__(self, model, prompts: Sequence[Sequence[int]], task_names: Sequence[str]) -> list[LabelScores]:
        """Scores of each prompt for its task (one shared prompt pass for the whole batch)."""
        if not prompts:
            return []
        was_training = model.training
        model.eval()
        try:
            shared = SharedPrompts(model, prompts, _pad_id(self.tokenizer))
            out: list[LabelScores | None] = [None] * len(prompts)
            for name in dict.fromkeys(task_names):
                items = [i for i, n in enumerate(task_names) if n == name]
                task = self.tasks[name]
                walk = self._single if task.kind in SINGLE_LABEL_KINDS else self._walk
                for i, s in zip(items, walk(shared, task, items)):
                    out[i] = s
        finally:
            model.train(was_training)
        return out  # type: ignore[return-value]

    def _single(self, shared: SharedPrompts, task: Task, items: list[int]) -> list[LabelScores]:
        candidates = [self.ids(task.label_sentence([lab])) for lab in task.labels]
        common = _common_prefix(candidates)  # "该帖子的发布者有": run once per item, not once per candidate
        wanted = set(items)
        grown = shared.extend([common if i in wanted else [] for i in range(shared.n_items)], items)
        rest = [c[len(common) :] for c in candidates]
        scores = grown.score([rest if i in wanted else [] for i in range(shared.n_items)])
        out = []
        for i in items:
            probs = torch.tensor(scores[i], dtype=torch.float64).softmax(0).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            out.append(LabelScores(dict(zip(task.labels, probs)), [task.labels[best]]))
        return out

    def _tails(self, task: Task, label: str) -> tuple[str, ...]:
        """What may follow `label` in the list. A label no other label of the task starts with is the next item
        whatever follows it (its own tokens suffice, one candidate); one that starts another (CP's parent
        `触发性事件` of `触发性事件-生活`) must be followed by the joiner or the closing text (two candidates)."""
        key = (task.name, label)
        if key not in self._tail_cache:
            prefix_of_another = any(other != label and other.startswith(label) for other in task.labels)
            closing = task.answer_template.partition("{labels}")[2]
            self._tail_cache[key] = (task.label_joiner, closing) if prefix_of_another else ("",)
        return self._tail_cache[key]

    def _walk(self, shared: SharedPrompts, task: Task, items: list[int]) -> list[LabelScores]:
        """The label walk of the module docstring, in rounds: every undecided label is scored against the list so
        far at once; the first one above 0.5 joins the list (the labels before it are decided no) and the next
        round continues after it. Rounds: one more than the labels taken."""
        prefix = task.answer_template.partition("{labels}")[0]
        joiner, labels, n = task.label_joiner, task.labels, shared.n_items
        chosen: dict[int, list[str]] = {i: [] for i in items}
        probs: dict[int, dict[str, float]] = {i: {} for i in items}
        undecided = {i: 0 for i in items}  # index of the first label not yet decided
        while active := [i for i in items if undecided[i] < len(labels)]:
            context = {i: prefix + "".join(c + joiner for c in chosen[i]) for i in active}
            context_ids = {i: self.ids(context[i]) for i in active}
            grown = shared.extend([context_ids.get(i, []) for i in range(n)], active)
            wanted: list[list[list[int]]] = [[] for _ in range(n)]
            split: dict[int, list[bool]] = {}  # per candidate: scored after the context (True) or as a whole
            whole: list[list[list[int]]] = [[] for _ in range(n)]
            for i in active:
                split[i] = []
                for lab in labels[undecided[i] :]:
                    for tail in self._tails(task, lab):
                        full = self.ids(context[i] + lab + tail)
                        ctx = context_ids[i]
                        # The context's tokens are a prefix of the candidate's unless a merge crosses the boundary.
                        if full[: len(ctx)] == ctx:
                            wanted[i].append(full[len(ctx) :])
                            split[i].append(True)
                        else:
                            whole[i].append(full)
                            split[i].append(False)
                if any(not s for s in split[i]):
                    whole[i].append(context_ids[i])
            after = grown.score(wanted)
            alone = shared.score(whole) if any(whole) else [[] for _ in range(n)]
            for i in active:
                a, w = iter(after[i]), iter(alone[i][:-1] if alone[i] else [])
                base = alone[i][-1] if alone[i] else 0.0
                values = iter([next(a) if s else next(w) - base for s in split[i]])
                for lab in labels[undecided[i] :]:
                    p = min(1.0, sum(math.exp(next(values)) for _ in self._tails(task, lab)))
                    probs[i][lab] = p
                    if p > 0.5:
                        chosen[i].append(lab)
                        undecided[i] = labels.index(lab) + 1
                        break
                else:
                    undecided[i] = len(labels)
        return [LabelScores({lab: probs[i][lab] for lab in labels}, chosen[i]) for i in items]


def _common_prefix(sequences: list[list[int]]) -> list[int]:
    first = sequences[0] if sequences else []
    k = 0
    while k < len(first) and all(len(s) > k + 1 and s[k] == first[k] for s in sequences):
        k += 1
    return first[:k]


def answer_of(task: Task, labels: list[str]) -> str:
    """The label sentence of `labels`: what the scoring path parses for a likelihood prediction."""
    return task.label_sentence(labels if task.kind not in SINGLE_LABEL_KINDS else labels[:1])
