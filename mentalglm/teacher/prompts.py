"""The teacher's prompts: the paper's explanation prompt (Appendix B), translation, and zero/few-shot baselines.

Explanation prompt = the task's instruction (a file the user supplies), the label definitions, expert-written
examples chosen per category, then the post with its gold labels and the canonical answer form to write. The
templates are config (build_data.yaml `prompts:`), one per language, with named `{slots}`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from mentalglm.data.loaders import load_records
from mentalglm.data.splits import post_of
from mentalglm.errors import ConfigError
from mentalglm.scoring.parsing import cp_parent_child_sets, explanation_part
from mentalglm.tasks import Task

log = logging.getLogger(__name__)


def raw_post(record: dict) -> str:
    """The post as the record holds it (inside the query), whitespace kept."""
    start, end = record.get("post_start", -1), record.get("post_end", -1)
    return record["query"][start:end] if start is not None and start >= 0 else record["query"]


def read_instruction(task: Task, path: str | None) -> str:
    if not path:
        raise ConfigError(
            f"no instruction for task {task.name}: set instructions.{task.name}=PATH (a text file with the "
            "task-specific instruction of the teacher prompt)"
        )
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"instructions.{task.name}={path}: not a file")
    text = file.read_text(encoding="utf-8-sig").strip()
    if not text:
        raise ConfigError(f"instructions.{task.name}={path}: the file is empty")
    return text


def read_examples(task: Task, path: str | None) -> list[dict]:
    """Expert-written examples of a task: any file the loaders read (alpaca/chat JSONL, IMHI CSV, ...), each
    answer with its explanation."""
    if not path:
        return []
    records = load_records(task, path)
    bad = [r["id"] for r in records if not explanation_part(task, r["answer"])]
    if bad:
        raise ConfigError(
            f"examples.{task.name}={path}: item {bad[0]!r} has no explanation after "
            f"{task.explanation_marker.strip()!r} ({len(bad)} such items); expert examples carry one"
        )
    if not records:
        raise ConfigError(f"examples.{task.name}={path}: no examples in the file")
    return records


def label_units(task: Task, labels: list[str]) -> set[str]:
    """What a label list covers: its labels, and for a hierarchical task every parent and child it names."""
    if task.kind == "hierarchical":
        parents, children = cp_parent_child_sets(task, labels)
        return parents | children
    return set(labels)


def coverage_units(task: Task) -> list[str]:
    if task.kind == "hierarchical":
        return [*task.parents, *task.children]
    return list(task.labels)


def choose_examples(task: Task, examples: list[dict], per_label: int | None) -> tuple[list[dict], dict[str, int]]:
    """Examples so that each label (hierarchical: each parent and child) is shown `per_label` times where the
    file allows; None = every example (the paper's prompts hold all of them). Returns the chosen examples in
    file order and how often each label is covered."""
    if per_label is None:
        chosen = examples
    else:
        picked: list[int] = []
        counts: Counter = Counter()
        for unit in coverage_units(task):
            for i, ex in enumerate(examples):
                if counts[unit] >= per_label:
                    break
                if i not in picked and unit in label_units(task, ex["labels"]):
                    picked.append(i)
                    counts.update(label_units(task, ex["labels"]))
        chosen = [examples[i] for i in sorted(picked)]
    counts = Counter(u for ex in chosen for u in label_units(task, ex["labels"]))
    return chosen, {unit: counts[unit] for unit in coverage_units(task)}


def label_list(task: Task, labels: list[str]) -> str:
    return task.label_joiner.join(task.order_labels(labels)) or task.none_word


def label_set(task: Task) -> str:
    """The labels a model may answer with (display names in brackets for English readers of Chinese labels)."""
    return task.label_joiner.join(task.labels)


def render_examples(task: Task, template: str, examples: list[dict]) -> str:
    return "".join(
        template.format(i=i, post=post_of(ex), labels=label_list(task, ex["labels"]), answer=ex["answer"].strip())
        for i, ex in enumerate(examples, 1)
    )


def explain_messages(
    task: Task, record: dict, *, instruction: str, examples: list[dict], prompts: Mapping[str, str], system: str | None
) -> list[dict]:
    """The paper's prompt for one item: instruction, label definitions, expert examples, the post and its gold
    labels, and the canonical answer form (label sentence, marker, explanation)."""
    labels = record["labels"]
    user = prompts["explain"].format(
        instruction=instruction,
        description=task.description.strip() or label_set(task),
        examples=render_examples(task, prompts["example"], examples),
        post=raw_post(record),
        aspect=record.get("aspect") or "",
        labels=label_list(task, labels),
        label_sentence=task.label_sentence(labels),
        marker=task.explanation_marker.strip(),
    )
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def translate_messages(text: str, prompts: Mapping[str, str], system: str | None) -> list[dict]:
    user = prompts["translate"].format(text=text)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def baseline_messages(
    task: Task, record: dict, shots: list[dict], prompts: Mapping[str, str], system: str | None
) -> list[dict]:
    """A zero- or k-shot prompt that states the label set and definitions (the paper's Eq. 1 task description):
    without them a zero-shot model cannot know which labels to choose from."""
    user = prompts["baseline"].format(
        description=task.description.strip() or label_set(task),
        labels=label_set(task),
        examples="".join(
            prompts["shot"].format(i=i, query=s["query"], answer=s["answer"].strip()) for i, s in enumerate(shots, 1)
        ),
        query=record["query"],
    )
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _script(c: str) -> str:
    o = ord(c)
    if 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF:
        return "han"
    if 0x3040 <= o <= 0x30FF or 0xFF66 <= o <= 0xFF9F or 0x31F0 <= o <= 0x31FF:
        return "Japanese kana"
    if 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
        return "Korean hangul"
    if c.isascii() or 0xC0 <= o <= 0x24F:
        return "latin"
    return "other"


def language_problem(text: str, language: str) -> str | None:
    """Why `text` is not in `language` (zh: Chinese characters, with no more than a trace of kana or hangul, which
    would make it Japanese or Korean; en: mostly Latin letters), or None when it is."""
    letters = [_script(c) for c in text if c.isalpha()]
    if not letters:
        return "no letters"
    share = {s: letters.count(s) / len(letters) for s in set(letters)}
    if language == "zh":
        for other in ("Japanese kana", "Korean hangul"):
            if share.get(other, 0) >= 0.05:
                return f"{other} ({share[other]:.0%} of the letters)"
        return None if share.get("han", 0) >= 0.3 else "too few Chinese characters"
    if share.get("latin", 0) >= 0.7:
        return None
    found = max(share, key=share.get)
    return f"mostly {found if found != 'han' else 'Chinese characters'}"


def has_language(text: str, language: str) -> bool:
    return language_problem(text, language) is None


def instruction_row(
    task: Task, record: dict, answer: str, entry: dict | None, revised: bool, model: str, agrees: bool = True
) -> dict:
    """One row of explanation-bearing instruction data as build_data.py writes it (alpaca form, read by
    data=c_imhi as it is): the query, the canonical answer, the gold labels and where the answer came from."""
    row = {
        "task": task.name,
        "id": record["id"],
        "instruction": record["query"],
        "input": "",
        "output": answer,
        "labels": task.order_labels(record["labels"]),
    }
    if record.get("aspect"):
        row["aspect"] = record["aspect"]
    row["provenance"] = {
        "teacher_model": (entry or {}).get("model", model),
        "prompt_sha256": (entry or {}).get("prompt_sha256"),
        "date": (entry or {}).get("date"),
        "revised": revised,
        **({} if agrees else {"agrees_with_gold": False}),
    }
    return row
