"""Read label(s) out of generated answers.

Rules, in order:
1. NFKC-normalise (full-width punctuation and letters become half-width) and, for case-insensitive tasks
   (IMHI, English), lower-case.
2. Keep only the answer part: the text before the first explanation marker (`推理:` / `Reasoning:`);
   the whole text when there is no marker.
3. Find every occurrence of every label name and alias, then keep non-overlapping longest matches
   (CP's `情感` inside `情感效应` is no hit). English terms need word ends (`work` is not in `homework`,
   `no` is not in `know`).
4. Single-label tasks: the earliest match wins. Multi-label: every match, deduplicated, in task label
   order. Hierarchical (CP): children imply their parent; a bare parent is kept only when none of its
   children was found.
5. Nothing recognisable -> ParseResult([], parsed=False). Never a default class.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from mentalglm.tasks import SINGLE_LABEL_KINDS, Task


@dataclass(frozen=True)
class ParseResult:
    labels: list[str]
    parsed: bool


@dataclass(frozen=True)
class _Vocab:
    pattern: re.Pattern  # alternation of every surface form, longest first
    targets: dict[str, str]  # normalised surface form -> canonical label
    marker: re.Pattern | None
    raw_marker: re.Pattern | None  # the marker in un-normalised text, to normalise only what comes before it
    marker_word: str
    marker_tails: tuple[str, ...]  # label terms that end with the marker word ("情绪化推理")
    none_word: re.Pattern | None
    order: dict[str, int]


def normalize(task: Task, text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return text if task.case_sensitive else text.lower()


def _norm_term(task: Task, term: str) -> str:
    return " ".join(normalize(task, term).split())


def _term_regex(term: str) -> str:
    # Any run of whitespace inside a multi-word term; word ends only where the term starts/ends alphanumeric.
    body = r"\s+".join(re.escape(part) for part in term.split(" "))
    if _is_word_char(term[0]):
        # The start check sits after the first literal ("w(?<![0-9A-Za-z]w)ork"), not before it:
        # alternatives that all open with a literal let `re` skip ahead by first character (much faster).
        first = re.escape(term[0])
        body = f"{first}(?<![0-9A-Za-z]{first}){body[len(first) :]}"
    if _is_word_char(term[-1]):
        body += r"(?![0-9A-Za-z])"
    return body


def _is_word_char(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def _surface_forms(task: Task) -> dict[str, str]:
    """Every surface form the parser accepts -> the canonical label it stands for."""
    forms: dict[str, str] = {}

    def add(term: str, label: str) -> None:
        key = _norm_term(task, term)
        if forms.get(key, label) != label:
            raise ValueError(f"task {task.name}: {term!r} is an alias of both {forms[key]!r} and {label!r}")
        forms[key] = label

    if task.kind == "hierarchical":
        # Parents and children are matched on their own, so any separator between them works
        # ("父类-子类", "父类##子类", "父类：子类", "子类" alone).
        for parent, kids in task.parents.items():
            add(parent, parent)
            for child in kids:
                leaf = task.leaf(parent, child)
                add(child, leaf)
                for alias in task.aliases.get(child, ()):
                    add(alias, leaf)
        return forms
    for label in task.labels:
        add(label, label)
        for alias in task.aliases.get(label, ()):
            add(alias, label)
    return forms


_VOCABS: dict[tuple, _Vocab] = {}


def _cache_key(task: Task) -> tuple:
    # Task holds dicts, so it is not hashable; key on everything the vocabulary depends on.
    return (
        task.name,
        task.kind,
        task.labels,
        task.explanation_marker,
        task.none_word,
        task.case_sensitive,
        task.child_sep,
        repr(sorted(task.aliases.items())),
        repr(list(task.parents.items())),
    )


def _vocab(task: Task) -> _Vocab:
    key = _cache_key(task)
    vocab = _VOCABS.get(key)
    if vocab is None:
        vocab = _VOCABS[key] = _build_vocab(task)
    return vocab


def _build_vocab(task: Task) -> _Vocab:
    targets = _surface_forms(task)
    terms = sorted(targets, key=lambda t: (-len(t), t))
    pattern = re.compile("|".join(_term_regex(t) for t in terms))

    marker_word = _norm_term(task, task.explanation_marker.strip()).rstrip(":").strip()
    marker = re.compile(re.escape(marker_word) + r"\s*:") if marker_word else None
    raw_word = task.explanation_marker.strip().rstrip(":：").strip()
    flags = 0 if task.case_sensitive else re.IGNORECASE
    raw_marker = re.compile(re.escape(raw_word) + r"\s*[:：]", flags) if raw_word else None
    tails = tuple(t for t in terms if marker_word and t.endswith(marker_word) and t != marker_word)

    none_word = None
    if task.none_word and task.kind not in SINGLE_LABEL_KINDS:
        word = _norm_term(task, task.none_word)
        # "无" only as a whole token: "认知歪曲：无。" is parsed-empty, "无法判断" is not.
        none_word = re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)")
    return _Vocab(pattern, targets, marker, raw_marker, marker_word, tails, none_word, task.label_order)


def answer_part(task: Task, text: str) -> str:
    """The normalised text before the explanation marker (all of it when there is none)."""
    return _normalized_answer(task, _vocab(task), text or "")


def explanation_part(task: Task, text: str) -> str:
    """The explanation: the text after the first explanation marker, as written ("" when there is none)."""
    vocab = _vocab(task)
    if vocab.raw_marker is None or not text:
        return ""
    word = len(task.explanation_marker.strip().rstrip(":：").strip())
    for m in vocab.raw_marker.finditer(text):
        before = normalize(task, text[: m.start() + word])
        if any(before.endswith(t) for t in vocab.marker_tails):
            continue  # "情绪化推理：" is a label followed by a colon, not the marker
        return text[m.end() :].strip()
    return ""


def _normalized_answer(task: Task, vocab: _Vocab, text: str) -> str:
    # NFKC over a long explanation costs far more than the parse: normalise only up to the first
    # plain-looking marker when there is one. Whole-text normalisation remains the fallback, so a
    # full-width marker, or a label ending like the marker ("情绪化推理："), gives the same answer.
    m = vocab.raw_marker.search(text) if vocab.raw_marker is not None else None
    if m is not None:
        head = normalize(task, text[: m.end()])
        answer = _answer_part(vocab, head)
        if len(answer) < len(head):
            return answer
    return _answer_part(vocab, normalize(task, text))


def _answer_part(vocab: _Vocab, text: str) -> str:
    if vocab.marker is None:
        return text
    for m in vocab.marker.finditer(text):
        # "情绪化推理:" is a label followed by a colon, not the marker.
        if any(text.endswith(t, 0, m.start() + len(vocab.marker_word)) for t in vocab.marker_tails):
            continue
        return text[: m.start()]
    return text


def _find(vocab: _Vocab, text: str) -> list[str]:
    """Canonical labels of the non-overlapping longest matches, by position."""
    candidates = []  # (start, end)
    pos = 0
    while (m := vocab.pattern.search(text, pos)) is not None:
        # Alternatives are sorted longest first, so this is the longest term starting at m.start().
        candidates.append((m.start(), m.end()))
        pos = m.start() + 1
    if not candidates:
        return []
    taken = bytearray(len(text))
    chosen = []
    for start, end in sorted(candidates, key=lambda c: (c[0] - c[1], c[0])):
        if not any(taken[start:end]):
            taken[start:end] = b"\x01" * (end - start)
            chosen.append((start, end))
    chosen.sort()
    return [vocab.targets[" ".join(text[s:e].split())] for s, e in chosen]


def parse_labels(task: Task, text: str) -> ParseResult:
    vocab = _vocab(task)
    answer = _normalized_answer(task, vocab, text or "")
    found = _find(vocab, answer)
    if not found:
        if vocab.none_word is not None and vocab.none_word.search(answer):
            return ParseResult([], True)
        return ParseResult([], False)
    if task.kind in SINGLE_LABEL_KINDS:
        return ParseResult([found[0]], True)
    labels = set(found)
    if task.kind == "hierarchical":
        splits = _cp_splits(task)
        labels -= {splits[leaf][0] for leaf in labels if splits[leaf][1] is not None}
    return ParseResult(sorted(labels, key=vocab.order.__getitem__), True)


_CP_SPLITS: dict[tuple, dict[str, tuple[str, str | None]]] = {}


def _cp_splits(task: Task) -> dict[str, tuple[str, str | None]]:
    key = _cache_key(task)
    splits = _CP_SPLITS.get(key)
    if splits is None:
        splits = {p: (p, None) for p in task.parents}
        splits.update({task.leaf(p, c): (p, c) for p, kids in task.parents.items() for c in kids})
        _CP_SPLITS[key] = splits
    return splits


def cp_parent_child_sets(task: Task, labels) -> tuple[set[str], set[str]]:
    """Parent names and child names of hierarchical labels (leaves "父类-子类" or lone parents)."""
    splits = _cp_splits(task)
    parents, children = set(), set()
    for label in labels:
        try:
            parent, child = splits[label]
        except KeyError:
            raise ValueError(f"label {label!r} is not in task {task.name}'s label set") from None
        parents.add(parent)
        if child is not None:
            children.add(child)
    return parents, children
