"""Read label(s) out of generated answers.

Rules, in order:
1. NFKC-normalise (full-width punctuation and letters become half-width), for case-insensitive tasks
   (IMHI, English) lower-case, for Chinese tasks traditional characters become simplified (讀心術 -> 读心术).
2. Keep only the answer part: the text before the first explanation marker: the task's own (`推理:` /
   `Reasoning:`) or any word of its `explanation_markers` with a colon, in bold (`**推理**:`) or as a markdown
   heading (`### 推理`); the whole text when there is none.
3. Mask `parser_idioms` (毫无疑问, "no doubt": neither a label nor a negation), then find every occurrence of
   every label name and alias and keep non-overlapping longest matches (CP's `情感` inside `情感效应` is no hit).
   English terms need word ends (`work` is not in `homework`, `no` is not in `know`).
4. A match in a negation's scope is not predicted: a word of the task's `negations` at most a few characters or
   words before it, in the same clause, with no `contrasts` word between (`不是高自杀风险`, `难以看出有读心术`,
   `no signs of depression`; in `不是A，而是B` and "not A but B" only A is negated); two cues in a row cancel
   (`不能排除高自杀风险`).
5. Single-label tasks: the earliest match wins; when every match is negated and names one label of a binary
   task, the other label (`没有高自杀风险` -> 低自杀风险). Multi-label: every match, deduplicated, in task label
   order. Hierarchical (CP): children imply their parent; a bare parent is kept only when none of its
   children was found.
6. Options are not answers: labels enumerated as lettered options (`A. 高自杀风险 B. 低自杀风险`, `(a) ... (b) ...`,
   `选项：A高自杀风险 B低自杀风险`), or numbered ones for a single-label task, are a list, not a statement. A
   choice stated after the list (a `choice_markers` word: `Correct answer: C`, `答案：B`, `I choose 2`) reads as its
   option's label(s) (or the label it names); with none the answer is unparsed, reason "options without a choice".
7. Nothing recognisable -> ParseResult([], parsed=False). Never a default class.

Every result says which rule read it (`rule`: stated, choice, negation (a binary task's other label), none (the
none word), conclusion (free mode, after a conclusion marker)) or, unparsed, why (`reason`).

`mode="free"` (zero/few-shot answers, free-form prediction files) reads, in turn: the text after the last
conclusion marker (`**结论**：低自杀风险`, `In conclusion, ...`), the answer part of rule 2, then the whole text,
where a single-label task takes the last match (reasoning-first answers end with their verdict) and a
multi-label task every match that is not negated.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

from mentalglm.tasks import PARSER_FIELDS, SINGLE_LABEL_KINDS, Task

MODES = ("strict", "free")
# Characters that end a clause: a negation never reaches past one.
CLAUSE_RE = re.compile("[，。；！？、,;.!?:\n]")
NEGATION_GAP = {"zh": 4, "en": 4}  # characters (zh) or words (en) allowed between a negation and the label


@dataclass(frozen=True)
class ParseResult:
    labels: list[str]
    parsed: bool
    # How it was read (not part of equality: two readings of the same labels are the same answer).
    rule: str = field(default="", compare=False)  # stated | choice | negation | none | conclusion ("" unparsed)
    reason: str = field(default="", compare=False)  # unparsed: why (no label found | options without a choice)


NO_LABEL = "no label found"
OPTIONS_WITHOUT_CHOICE = "options without a choice"
# An option marker just before a label: "A. ", "a) ", "(b) ", "C：", "D、", "1. ", "(2) ", or a bare capital
# ("选项：A高自杀风险"), after the start, a space or punctuation (so "a" the English article is no marker).
_OPTION_BEFORE = re.compile(
    r"(?:(?<=[\s(\[:;,/|>*。，；])|^)(?:\((?P<p>[A-Ja-j1-9])\)|(?P<k>[A-Ja-j1-9])\s?[).\]:、]|(?P<c>[A-J]))\s*(?:\*\*)?\s*$"
)
# The key(s) a choice states: "C", "(b)", "A、C", "1 and 3"; a lower-case letter only with punctuation or the end
# after it ("answer: a." but not "the answer is a high risk").
_CHOICE_KEYS = re.compile(
    r"\s*(?:is|是|为|应为|应该是)?\s*[:：]?\s*(?:\*\*)?\s*"
    r"(?P<keys>[(\[]?[A-Ja-j1-9](?![A-Za-z0-9])[)\]]?(?:\s*(?:[,、&/]|和|及|and)\s*[(\[]?[A-Ja-j1-9](?![A-Za-z0-9])[)\]]?)*)"
    r"(?=\s*(?:[).\]:,;、。!\n*]|$)|\s+(?:because|since|as|-)\b|\s*[\u4e00-\u9fff])"
)


@dataclass(frozen=True)
class _Vocab:
    pattern: re.Pattern  # alternation of every surface form, longest first
    targets: dict[str, str]  # normalised surface form -> canonical label
    markers: tuple[re.Pattern, ...]  # explanation markers (colon form, heading form); group "w" is the word
    marker_tails: tuple[str, ...]  # label terms that end with a marker word ("情绪化推理")
    tail_window: int  # characters of raw text that hold the longest of them
    conclusions: tuple[re.Pattern, ...]
    negation: re.Pattern | None
    idioms: re.Pattern | None
    none_word: re.Pattern | None
    order: dict[str, int]
    choices: re.Pattern | None  # the choice_markers words
    contrast: re.Pattern | None  # the contrasts words: they end a negation's scope


@lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


def normalize(task: Task, text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    if task.language == "zh":
        text = _t2s().convert(text)
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
        task.language,
        tuple(task.parser_words(f) for f in PARSER_FIELDS),
    )


_BY_TASK: dict[int, tuple[Task, _Vocab]] = {}


def _vocab(task: Task) -> _Vocab:
    hit = _BY_TASK.get(id(task))
    if hit is not None and hit[0] is task:  # the same (immutable) task object: skip building the key
        return hit[1]
    key = _cache_key(task)
    vocab = _VOCABS.get(key)
    if vocab is None:
        vocab = _VOCABS[key] = _build_vocab(task)
    if len(_BY_TASK) > 1024:
        _BY_TASK.clear()
    _BY_TASK[id(task)] = (task, vocab)
    return vocab


def _words_regex(task: Task, words) -> str:
    """An alternation of normalised words, longest first; ASCII words only at word ends. The words starting with
    a letter share one left-boundary test behind a first-character check: a lookbehind per word made a scan of
    a sentence cost tens of microseconds."""
    forms = sorted({_norm_term(task, w) for w in words if w.strip()}, key=lambda w: (-len(w), w))

    def body(w: str) -> str:
        out = r"\s+".join(re.escape(x) for x in w.split(" "))
        return out + r"(?![0-9A-Za-z])" if _is_word_char(w[-1]) else out

    bounded = [w for w in forms if _is_word_char(w[0])]
    parts = [body(w) for w in forms if not _is_word_char(w[0])]
    if bounded:
        first = "".join(sorted({re.escape(w[0]) for w in bounded}))
        parts.append(rf"(?=[{first}])(?<![0-9A-Za-z])(?:" + "|".join(body(w) for w in bounded) + ")")
    return "|".join(parts)


def _section_patterns(task: Task, words, separators: str) -> tuple[re.Pattern, ...]:
    """A section word with a separator (`推理:`, `**推理**:`, `**Reasoning:**`) and as a markdown heading or a
    bold line of its own (`### 推理`). Both match raw and normalised text (full-width colons and stars too)."""
    alternation = _words_regex(task, words)
    if not alternation:
        return ()
    flags = 0 if task.case_sensitive else re.IGNORECASE
    bold = r"(?:\*\*|__|＊＊)"
    sep = f"[{separators}]"
    inline = rf"{bold}?(?P<w>{alternation}){bold}?[ \t]*{sep}|{bold}(?P<w2>{alternation})[ \t]*{sep}[ \t]*{bold}"
    own_line = rf"(?:^|\n)[ \t]*(?:#{{1,6}}[ \t]*{bold}?|{bold})(?P<w>{alternation}){bold}?[ \t]*(?=\n|$)(?P<w2>)"
    return re.compile(inline, flags), re.compile(own_line, flags)


def _build_vocab(task: Task) -> _Vocab:
    targets = _surface_forms(task)
    terms = sorted(targets, key=lambda t: (-len(t), t))
    pattern = re.compile("|".join(_term_regex(t) for t in terms))

    own = task.explanation_marker.strip().rstrip(":：").strip()
    marker_words = [w for w in (own, *task.parser_words("explanation_markers")) if w]
    markers = _section_patterns(task, marker_words, ":：")
    normalised = [_norm_term(task, w) for w in marker_words]
    tails = tuple(t for t in terms if any(t.endswith(w) and t != w for w in normalised))
    conclusions = _section_patterns(task, task.parser_words("conclusion_markers"), ":：,，")
    negation = _words_regex(task, task.parser_words("negations"))
    idioms = _words_regex(task, task.parser_words("parser_idioms"))

    none_word = None
    if task.none_word and task.kind not in SINGLE_LABEL_KINDS:
        word = _norm_term(task, task.none_word)
        # "无" only as a whole token: "认知歪曲：无。" is parsed-empty, "无法判断" is not.
        none_word = re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)")
    return _Vocab(
        pattern,
        targets,
        markers,
        tails,
        2 * max(map(len, tails), default=0),
        conclusions,
        re.compile(negation) if negation else None,
        re.compile(idioms) if idioms else None,
        none_word,
        task.label_order,
        re.compile(choices) if (choices := _words_regex(task, task.parser_words("choice_markers"))) else None,
        re.compile(contrast) if (contrast := _words_regex(task, task.parser_words("contrasts"))) else None,
    )


def _sections(task: Task, vocab: _Vocab, patterns: tuple[re.Pattern, ...], text: str, first: bool = False):
    """(start, end) of the section words in `text`, by position (`first`: only the earliest); a label ending like
    a marker word followed by a colon ("情绪化推理：") is no marker."""
    found, limit = [], len(text)
    for pat in patterns:
        for m in pat.finditer(text, 0, limit):
            word_end = m.end("w") if m.group("w") is not None else m.end("w2")
            # a window twice as long as the longest such label holds it (also after NFKC changes lengths)
            head = normalize(task, text[max(0, word_end - vocab.tail_window) : word_end])
            if any(head.endswith(t) for t in vocab.marker_tails):
                continue
            found.append((m.start(), m.end()))
            if first:
                limit = m.start()  # the next pattern only needs to look before it
                break
    return sorted(found)[:1] if first else sorted(found)


def answer_part(task: Task, text: str) -> str:
    """The normalised text before the explanation marker (all of it when there is none)."""
    return _normalized_answer(task, _vocab(task), text or "")


def explanation_part(task: Task, text: str) -> str:
    """The explanation: the text after the first explanation marker, as written ("" when there is none)."""
    vocab = _vocab(task)
    if not text:
        return ""
    found = _sections(task, vocab, vocab.markers, text, first=True)
    return text[found[0][1] :].strip() if found else ""


def _normalized_answer(task: Task, vocab: _Vocab, text: str) -> str:
    # Normalising a long explanation costs far more than the parse: normalise only up to the first
    # marker found in the raw text when there is one. Whole-text normalisation remains the fallback, so a
    # marker that only normalisation reveals gives the same answer.
    found = _sections(task, vocab, vocab.markers, text, first=True)
    if found:
        head = normalize(task, text[: found[0][1]])
        answer = _answer_part(task, vocab, head)
        if len(answer) < len(head):
            return answer
    return _answer_part(task, vocab, normalize(task, text))


def _answer_part(task: Task, vocab: _Vocab, text: str) -> str:
    found = _sections(task, vocab, vocab.markers, text, first=True)
    return text[: found[0][0]] if found else text


def _find(vocab: _Vocab, text: str) -> list[tuple[str, int, int]]:
    """(canonical label, start, end) of the non-overlapping longest matches, by position."""
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
    return [(vocab.targets[" ".join(text[s:e].split())], s, e) for s, e in chosen]


def _gap(task: Task, text: str) -> int:
    return len(text.split()) if task.language == "en" else len("".join(text.split()))


def _negated(task: Task, vocab: _Vocab, text: str, start: int, previous_end: int, clause_ends: list[int]) -> bool:
    """Whether a negation governs the label at `start`: a cue shortly before it, after the previous match, in the
    same clause and after any contrast word (`不是A，而是B`, "not A but B"); two cues in a row cancel
    (`不能排除`, "not unlikely")."""
    if vocab.negation is None:
        return False
    i = bisect.bisect_left(clause_ends, start)
    lo = max(previous_end, clause_ends[i - 1] + 1 if i else 0)
    cues = list(vocab.negation.finditer(text, lo, start))
    if cues and vocab.contrast is not None:
        for m in vocab.contrast.finditer(text, lo, start):
            if not any(c.start() <= m.start() < c.end() for c in cues):  # "rather" of "rather than" is a cue
                cues = [c for c in cues if c.start() >= m.end()]
    if not cues or _gap(task, text[cues[-1].end() : start]) > NEGATION_GAP[task.language]:
        return False
    chained = 1  # cues each within two characters / one word of the next negate each other
    while chained < len(cues) and _gap(task, text[cues[-chained - 1].end() : cues[-chained].start()]) <= (
        1 if task.language == "en" else 2
    ):
        chained += 1
    return chained % 2 == 1


def _mask_idioms(vocab: _Vocab, text: str) -> str:
    if vocab.idioms is None or vocab.idioms.search(text) is None:
        return text
    return vocab.idioms.sub(lambda m: " " * len(m.group()), text)


def _options(task: Task, text: str, hits: list[tuple[str, int, int]]) -> tuple[dict[str, list[str]], int]:
    """({key: the labels of its option} of an enumeration of options among the hits, the end of the list); ({}, 0)
    when none. An option holds every label up to the next key ("A. 触发性事件-生活": parent and child). Numbered
    lists count only for single-label tasks (a multi-label answer may list its labels as 1. 2. 3.)."""
    keyed: dict[str, list[str]] = {}
    key, end = None, 0
    for label, start, stop in hits:
        m = _OPTION_BEFORE.search(text, max(0, start - 12), start)
        if m is not None:
            key = (m.group("p") or m.group("k") or m.group("c")).upper()
            if key.isdigit() and task.kind not in SINGLE_LABEL_KINDS:
                key = None
                continue
            keyed.setdefault(key, [])
        elif key is None or text[end:start].strip(" -#:/|>") or CLAUSE_RE.search(text, end, start):
            continue  # not part of an option: a label mentioned elsewhere
        if key is not None and label not in keyed[key]:
            keyed[key].append(label)
            end = stop
    return (keyed, end) if len(keyed) >= 2 else ({}, 0)


def _stated_choice(vocab: _Vocab, text: str, start: int, options: dict[str, list[str]]) -> list[str] | None:
    """The labels a choice after the options states: its keys' options, or the label named right after the choice
    word; None when no choice is stated."""
    if vocab.choices is None:
        return None
    for word in vocab.choices.finditer(text, start):
        m = _CHOICE_KEYS.match(text, word.end())
        if m is not None:
            keys = re.findall(r"[A-Ja-j1-9]", m.group("keys"))
            if all(k.upper() in options for k in keys):
                return [label for k in keys for label in options[k.upper()]]
        named = _find(vocab, text[word.end() : word.end() + 40])
        if named and not text[word.end() : word.end() + named[0][1]].strip(" :：*()[]是为is"):
            return [named[0][0]]
    return None


def _ordered(task: Task, vocab: _Vocab, labels) -> list[str]:
    labels = set(labels)
    if task.kind == "hierarchical":
        splits = _cp_splits(task)
        labels -= {splits[leaf][0] for leaf in labels if splits[leaf][1] is not None}
    return sorted(labels, key=vocab.order.__getitem__)


def _read(task: Task, vocab: _Vocab, text: str, *, last: bool = False, rest: str = "") -> ParseResult:
    """`rest`: text after `text` (strict mode: the explanation) where a choice after an option list may stand."""
    text = _mask_idioms(vocab, text)
    kept, negated, previous_end = [], [], 0
    hits = _find(vocab, text)
    options, list_end = _options(task, text, hits) if len(hits) >= 2 else ({}, 0)
    if options:
        chosen = _stated_choice(vocab, text, list_end, options)
        if chosen is None and rest:
            chosen = _stated_choice(vocab, rest, 0, options)
        if chosen is None:
            return ParseResult([], False, reason=OPTIONS_WITHOUT_CHOICE)
        if task.kind in SINGLE_LABEL_KINDS:
            return ParseResult(chosen[:1], True, "choice")
        return ParseResult(_ordered(task, vocab, chosen), True, "choice")
    clause_ends = [m.start() for m in CLAUSE_RE.finditer(text)] if hits and vocab.negation is not None else []
    was_negated = False
    for label, start, end in hits:
        # "不是认知歪曲-放大": a leaf written parent, separator, child is negated as one
        joined = was_negated and not text[previous_end:start].strip(" -#:/|>")
        was_negated = joined or _negated(task, vocab, text, start, previous_end, clause_ends)
        (negated if was_negated else kept).append(label)
        previous_end = end
    if not kept:
        if task.kind == "binary" and len(set(negated)) == 1:
            return ParseResult([next(lab for lab in task.labels if lab != negated[0])], True, "negation")
        if vocab.none_word is not None and vocab.none_word.search(text):
            return ParseResult([], True, "none")
        return ParseResult([], False, reason=NO_LABEL)
    if task.kind in SINGLE_LABEL_KINDS:
        return ParseResult([kept[-1] if last else kept[0]], True, "stated")
    return ParseResult(_ordered(task, vocab, kept), True, "stated")


def parse_labels(task: Task, text: str, mode: str = "strict") -> ParseResult:
    """The labels an answer states. `mode`: strict (the label sentence first, as the project's answers are
    written) or free (zero/few-shot and other free-form answers); see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"parser mode {mode!r} is not one of {', '.join(MODES)}")
    vocab = _vocab(task)
    text = text or ""
    if mode == "strict":
        answer = _normalized_answer(task, vocab, text)
        result = _read(task, vocab, answer)
        if result.reason == OPTIONS_WITHOUT_CHOICE and len(answer) < len(text):
            # The choice may come after the explanation marker ("A. … B. … Reasoning: … Correct answer: B").
            result = _read(task, vocab, answer, rest=normalize(task, text)[len(answer) :])
        return result
    full = normalize(task, text)
    conclusions = _sections(task, vocab, vocab.conclusions, full)
    if conclusions:
        verdict = _answer_part(task, vocab, full[conclusions[-1][1] :])
        result = _read(task, vocab, verdict)
        if result.parsed:
            return ParseResult(result.labels, True, "conclusion" if result.rule == "stated" else result.rule)
    answer = _answer_part(task, vocab, full)
    result = _read(task, vocab, answer, rest=full[len(answer) :])
    if result.parsed or result.reason == OPTIONS_WITHOUT_CHOICE:
        return result
    return _read(task, vocab, full, last=True)


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
