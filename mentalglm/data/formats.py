"""The format registry: every raw or instruction file layout the loaders read, each one entry.

An entry knows how to recognise its files (`detect`), where its rows come from (`rows`), how to read a header
(`header`) and a row (`record`), and which field a byte offset of a line falls in (`field_at`, for errors about
undecodable bytes). A task names its format (`format:` in its task file); a file may name another.

Labelled tables (`TableFormat`) are data too: a task file can describe a new layout inline, e.g.

    format: {delimiter: "\\t", header: true, id: 编号, text: 文本, labels: {multi_hot: true}}

Built in:

    sos_llm           SOS-HL-1K `*_LLM.csv`: TAB-separated, header `id label comment`, label 0/1
    sos_bert          SOS-HL-1K `*_BERT.tsv`: GBK, no header, columns `is_high is_low text`
    socialcd          SocialCD-3K TSV: one 0/1 column per label, then `内容`
    cp                `sentence<TAB>labels`, labels like `认知歪曲,认知歪曲##放大和缩小`
    imhi_instruction  IMHI CSV `query, gpt-3.5-turbo`, kept as is
    imhi_complete     IMHI CSV `post, question, response`, rebuilt into the instruction form
    alpaca            JSON list or JSONL of `instruction, input, output` (+ optional `task`, `id`, `aspect`)
    chat              JSONL of `messages: [{role, content}, ...]` (+ optional `task`, `id`, `aspect`)
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mentalglm.data.io import DataError, column_name, shown
from mentalglm.errors import ConfigError
from mentalglm.tasks import Task

csv.field_size_limit(2**31 - 1)  # IMHI posts can be long
LINE_END = re.compile(r"\r\n|\r|\n")
CP_SEP = "##"


@dataclass
class Ctx:
    """What a row parser needs: where it is, which task, the header's column positions, the task registry."""

    file: str
    fmt: Format
    task: Task | None
    tasks: Mapping[str, Task]
    templates: Mapping
    cols: dict[str, int] = field(default_factory=dict)
    ncols: int | None = None

    def error(self, reason: str, line: int, field: str | None, detail: str = "") -> DataError:
        return DataError(self.file, reason, line=line, field=field, detail=detail)

    def get(self, row: list[str], name: str) -> str:
        return row[self.cols[name]]


class Format:
    """One file layout. Subclasses fill in the parts their files have."""

    name: str = ""
    has_header: bool = False
    needs_task: bool = True  # False: rows may name their own task (instruction files)
    default_task: str | None = None

    def detect(self, path: Path, first_line: str) -> bool:
        return False

    def check_task(self, task: Task) -> None:
        """Raise ValueError when `task` cannot be read from this layout."""

    def rows(self, text: str, path: Path) -> Iterator[tuple[int, Any]]:
        """(line, row) pairs; line 0 carries the header as (line, cells)."""
        raise NotImplementedError

    def hub_rows(self, ds) -> Iterator[tuple[int, Any]]:
        cols = list(ds.column_names)
        if self.has_header:
            yield 0, (1, cols)
        for i, row in enumerate(ds, start=1):
            yield i, ["" if row[c] is None else str(row[c]) for c in cols]

    def header(self, ctx: Ctx, header: tuple[int, list[str]]) -> None:
        raise AssertionError(f"format {self.name} has no header")

    def record(self, ctx: Ctx, line: int, n: int, row) -> dict:
        raise NotImplementedError

    def field_at(self, line: str, offset: int, header: str) -> str:
        """The field a character offset of a (decoded) line falls in."""
        return "json"


# ----------------------------------------------------------------------------- shared row helpers
def record(
    task: Task, id_: str, query: str, answer: str, labels: list[str], aspect: str = "", span: tuple[int, int] = (-1, -1)
) -> dict:
    return {
        "task": task.name,
        "id": id_,
        "query": query,
        "answer": answer,
        "labels": labels,
        "aspect": aspect,
        "post_start": span[0],
        "post_end": span[1],
    }


def raw_record(task: Task, id_: str, post: str, labels: list[str]) -> dict:
    labels = task.order_labels(labels)
    query, start, end = task.format_query(post)
    return record(task, id_, query, task.format_answer(labels), labels, "", (start, end))


def check_columns(ctx: Ctx, line: int, row, expected: int) -> None:
    if isinstance(row, DataError):
        raise row
    if len(row) != expected:
        raise ctx.error("malformed line", line, "columns", f"expected {expected} columns, got {len(row)}")


def post_text(ctx: Ctx, line: int, value: str, name: str) -> str:
    post = value.strip()
    if not visible(post):
        raise ctx.error("empty post", line, name)
    return post


_INVISIBLE = re.compile(r"[\s\u200b-\u200f\u2060-\u2064\ufeff\u00ad\u180e]+")


def visible(text: str) -> bool:
    """Whether `text` holds anything but whitespace and zero-width characters."""
    return bool(_INVISIBLE.sub("", text))


def bit(ctx: Ctx, line: int, value: str, name: str) -> int:
    value = value.strip()
    if value not in ("0", "1"):
        raise ctx.error("label value is not 0/1", line, name, f"got {shown(value)}")
    return int(value)


def map_header(ctx: Ctx, header: list[str], line: int, required) -> None:
    names = [h.strip().lstrip("\ufeff") for h in header]
    for name in required:
        if name not in names:
            raise ctx.error("missing column", line, name, f"header has {[column_name(n) for n in names]}")
    ctx.cols = {name: i for i, name in enumerate(names)}
    ctx.ncols = len(names)


LF_LINE_END = re.compile(r"\r\n|\n")
LONE_CR = re.compile(r"\r(?!\n)")


def lines_of(text: str) -> list[str]:
    """The lines of a file: a file whose lines end in LF or CRLF keeps a lone CR as part of its line (a post pasted
    from an old Mac editor), as a spreadsheet shows it; a file of CR line ends is split on CR."""
    return (LF_LINE_END if "\n" in text else LINE_END).split(text)


def delimited_rows(text: str, path: Path, delimiter: str, has_header: bool, one_line: bool):
    """Rows exactly as Python's csv module reads the file (quoted newlines kept), with their first line; a lone CR
    in a file of LF or CRLF lines is kept inside its field (`lines_of`), not read as the end of the row."""
    held = None
    if "\n" in text and LONE_CR.search(text):
        held = next(c for c in map(chr, range(0xE000, 0xF900)) if c not in text)  # a private-use stand-in
        text = LONE_CR.sub(held, text)
    for line, row in _csv_rows(text, path, delimiter, has_header, one_line):
        if held is not None and isinstance(row, tuple):
            row = (row[0], [cell.replace(held, "\r") for cell in row[1]])
        elif held is not None and isinstance(row, list):
            row = [cell.replace(held, "\r") for cell in row]
        yield line, row


def _csv_rows(text: str, path: Path, delimiter: str, has_header: bool, one_line: bool):
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header_done = not has_header
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            yield start, DataError(path, "malformed line", line=start, field="columns", detail=str(e))
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not any(c.strip() for c in row):
            continue  # blank line: not an item
        if not header_done:
            header_done = True
            yield 0, (line, row)
            continue
        if one_line and start - line > 1:
            # These items never span lines: an unbalanced quote swallowed the lines after it.
            yield (
                line,
                DataError(
                    path,
                    "malformed line",
                    line=line,
                    field="columns",
                    detail=f"quoted field runs over {start - line} lines (unbalanced quote?)",
                ),
            )
            continue
        yield line, row
    if not header_done:
        raise DataError(path, "missing header", line=1, field="header")


def split_rows(text: str, delimiter: str):
    """Unquoted delimited lines (CP sentences carry quotes that are not CSV quoting)."""
    for i, line in enumerate(lines_of(text), start=1):
        if line.strip():
            yield i, line.split(delimiter)


def first_line(text: str) -> str:
    stripped = text.lstrip("\r\n")
    return LINE_END.split(stripped, maxsplit=1)[0] if stripped else ""


def _cells(line: str, delimiter: str) -> list[str]:
    if delimiter == ",":
        return [c.strip() for c in next(csv.reader([line]))] if line else []
    return [c.strip() for c in line.split(delimiter)]


# ----------------------------------------------------------------------------- labelled tables
@dataclass(frozen=True)
class LabelColumns:
    """Where a table row's labels are.

    column + values: one column holding a label (values maps raw values to labels; none = the label itself),
        with `sep` a list of labels; syntax "hierarchical" reads `父类,父类##子类` tokens (CP).
    one_hot: label -> its 0/1 column (single-label tasks: exactly one must be 1).
    multi_hot: one 0/1 column per label, named by the label; every other header column must be id or text.
    """

    column: str | None = None
    values: Mapping[str, str] | None = None
    sep: str | None = None
    syntax: str = "flat"
    one_hot: Mapping[str, str] | None = None
    multi_hot: bool = False

    def names(self) -> set[str]:
        """Labels the layout itself names (the task must have them)."""
        if self.values:
            return set(self.values.values())
        return set(self.one_hot or ())


@dataclass(frozen=True)
class TableFormat(Format):
    """A delimited file with a post column and label columns; records take their query and answer from the task."""

    name: str = "table"
    delimiter: str = "\t"
    header_row: bool = True  # the layout's `header:` (the first line names the columns)
    columns: tuple[str, ...] = ()  # headerless files: the column names, in order
    id: str | None = None  # id column (none: the data row number)
    text: str = "text"
    labels: LabelColumns = field(default_factory=LabelColumns)
    quoting: bool = True  # false: split lines on the delimiter (fields that quote text literally)
    detect_columns: tuple[str, ...] = ()  # header columns that identify this layout when no format is named
    default_task: str | None = None  # the task a file of this layout holds when the caller names none

    @property
    def has_header(self) -> bool:  # type: ignore[override]
        return self.header_row

    def detect(self, path: Path, first: str) -> bool:
        cells = _cells(first, self.delimiter)
        return bool(self.detect_columns) and all(c in cells for c in self.detect_columns)

    def check_task(self, task: Task) -> None:
        unknown = sorted(self.labels.names() - set(task.labels))
        if unknown:
            raise ValueError(
                f"format {self.name} holds labels {unknown}; task {task.name} has other labels "
                f"({', '.join(task.labels)})"
            )
        if self.labels.syntax == "hierarchical" and task.kind != "hierarchical":
            raise ValueError(f"format {self.name} holds hierarchical labels; task {task.name} is {task.kind}")

    def rows(self, text: str, path: Path):
        if not self.quoting:
            return split_rows(text, self.delimiter)
        return delimited_rows(text, path, self.delimiter, has_header=self.header_row, one_line=True)

    def _required(self, task: Task) -> list[str]:
        names = [self.id] if self.id else []
        if self.labels.column:
            names.append(self.labels.column)
        if self.labels.one_hot:
            names += list(self.labels.one_hot.values())
        if self.labels.multi_hot:
            names += list(task.labels)
        return names + [self.text]

    def header(self, ctx: Ctx, header) -> None:
        line, names = header[0], [h.strip().lstrip("\ufeff") for h in header[1]]
        if self.labels.multi_hot:
            known = {self.text, self.id}
            for name in names:
                if name not in known and name not in ctx.task.labels:
                    raise ctx.error(
                        "label outside the label set",
                        line,
                        column_name(name),
                        f"{ctx.task.name} labels: {ctx.task.labels}",
                    )
        map_header(ctx, names, line, self._required(ctx.task))

    def record(self, ctx: Ctx, line: int, n: int, row) -> dict:
        if not self.header_row:
            if not ctx.cols:
                ctx.cols = {name: i for i, name in enumerate(self.columns)}
            check_columns(ctx, line, row, len(self.columns))
        else:
            check_columns(ctx, line, row, ctx.ncols)
        task, spec = ctx.task, self.labels
        id_ = str(n)
        if self.id:
            id_ = ctx.get(row, self.id).strip()
            if not id_:
                raise ctx.error("empty id", line, self.id)
        if spec.multi_hot:
            labels = [lab for lab in task.labels if bit(ctx, line, ctx.get(row, lab), lab)]
        elif spec.one_hot:
            flags = {lab: bit(ctx, line, ctx.get(row, col), col) for lab, col in spec.one_hot.items()}
            labels = [lab for lab, on in flags.items() if on]
            if task.kind in ("binary", "multiclass") and len(labels) != 1:
                first = next(iter(spec.one_hot.values()))
                state = ", ".join(
                    f"{col}={flags[lab]}" for lab, col in sorted(spec.one_hot.items(), key=lambda kv: kv[1])
                )
                raise ctx.error("label outside the label set", line, first, f"{state}: exactly one must be 1")
        elif spec.syntax == "hierarchical":
            labels = parse_hierarchical(ctx, line, ctx.get(row, spec.column), spec.column)
        else:
            labels = self._column_labels(ctx, line, ctx.get(row, spec.column))
        return raw_record(task, id_, post_text(ctx, line, ctx.get(row, self.text), self.text), labels)

    def _column_labels(self, ctx: Ctx, line: int, value: str) -> list[str]:
        spec, task = self.labels, ctx.task
        raws = [v.strip() for v in value.split(spec.sep)] if spec.sep else [value.strip()]
        labels = []
        for raw in raws:
            if not raw and spec.sep:
                continue
            label = spec.values.get(raw) if spec.values else raw
            if label is None or label not in task.label_order:
                expected = " or ".join(spec.values) if spec.values else ", ".join(task.labels)
                raise ctx.error(
                    "label outside the label set", line, spec.column, f"got {shown(raw)}, expected {expected}"
                )
            labels.append(label)
        return labels

    def field_at(self, line: str, offset: int, header: str) -> str:
        col = line[:offset].count(self.delimiter)
        names = list(self.columns) if not self.header_row else _cells(header, self.delimiter)
        return names[col] if col < len(names) else f"column {col + 1}"


def parse_hierarchical(ctx: Ctx, line: int, value: str, column: str) -> list[str]:
    """`认知歪曲,认知歪曲##放大和缩小,情绪反应` -> leaves `父类-子类`, plus parents that have no child."""
    task = ctx.task
    parents, leaves = [], []
    for tok in re.split(r"[,，]", value):
        tok = tok.strip()
        if not tok:
            continue
        parent, sep, child = (s.strip() for s in tok.partition(CP_SEP))
        if parent not in task.parents:
            raise ctx.error("label outside the label set", line, column, f"unknown parent {shown(parent)}")
        if not sep:
            parents.append(parent)
        elif child in task.parents[parent]:
            leaves.append(task.leaf(parent, child))
        else:
            raise ctx.error("label outside the label set", line, column, f"unknown child {shown(child)} of {parent!r}")
    with_child = {task.parent_of(leaf.split(task.child_sep, 1)[1]) for leaf in leaves}
    return leaves + [p for p in parents if p not in with_child]


class _SosBert(TableFormat):
    def detect(self, path: Path, first: str) -> bool:
        cells = first.split("\t")
        return len(cells) == 3 and cells[0].strip() in ("0", "1") and cells[1].strip() in ("0", "1")


class _Cp(TableFormat):
    def detect(self, path: Path, first: str) -> bool:
        return len(first.split("\t")) == 2 or path.suffix.lower() == ".txt"


def table_format(name: str, spec: Mapping[str, Any]) -> TableFormat:
    """A `TableFormat` from a task file's inline `format:` mapping (unknown keys are an error)."""
    spec = dict(spec)
    labels = dict(spec.pop("labels", None) or {})
    allowed = {"delimiter", "header", "columns", "id", "text", "quoting", "detect_columns"}
    unknown = sorted(set(spec) - allowed)
    label_keys = {"column", "values", "sep", "syntax", "one_hot", "multi_hot"}
    unknown += [f"labels.{k}" for k in sorted(set(labels) - label_keys)]
    if unknown:
        raise ConfigError(
            f"format of task {name}: unknown keys {unknown}; a table layout takes "
            f"{sorted(allowed | {'labels'})} and labels takes {sorted(label_keys)}"
        )
    if sum(bool(labels.get(k)) for k in ("column", "one_hot", "multi_hot")) != 1:
        raise ConfigError(f"format of task {name}: labels needs exactly one of column, one_hot or multi_hot")
    if labels.get("syntax", "flat") not in ("flat", "hierarchical"):
        raise ConfigError(f"format of task {name}: labels.syntax is flat or hierarchical")
    if not spec.get("header", True) and not spec.get("columns"):
        raise ConfigError(f"format of task {name}: a headerless table needs `columns` (the column names in order)")
    values = labels.get("values")
    return TableFormat(
        name=f"{name} table",
        delimiter=spec.get("delimiter", "\t"),
        header_row=bool(spec.get("header", True)),
        columns=tuple(spec.get("columns") or ()),
        id=spec.get("id"),
        text=spec.get("text", "text"),
        quoting=bool(spec.get("quoting", True)),
        detect_columns=tuple(spec.get("detect_columns") or ()),
        labels=LabelColumns(
            column=labels.get("column"),
            sep=labels.get("sep"),
            syntax=labels.get("syntax", "flat"),
            values={str(k): v for k, v in values.items()} if values else None,
            one_hot=labels.get("one_hot"),
            multi_hot=bool(labels.get("multi_hot")),
        ),
    )


# ----------------------------------------------------------------------------- instruction data
def _gold(ctx: Ctx, line: int, name: str, answer: str, task: Task) -> list[str]:
    """Gold labels read off the label sentence (the text before the explanation marker)."""
    from mentalglm.scoring.parsing import parse_labels

    marker = task.explanation_marker.strip()
    head = answer.split(marker, 1)[0] if marker else answer
    result = parse_labels(task, head)
    if not result.parsed:
        raise ctx.error("answer has no readable label", line, name, f"the answer: {shown(answer)}")
    return task.order_labels(result.labels)


@lru_cache(maxsize=256)
def _template_regex(template: str) -> re.Pattern:
    head, _, tail = template.partition("{post}")

    def esc(s: str, first: list) -> str:
        parts = [re.escape(p) for p in s.split("{aspect}")]
        out = parts[0]
        for p in parts[1:]:
            out += ("(?P<aspect>.+?)" if not first else "(?P=aspect)") + p
            first.append(True)
        return out

    seen: list = []
    head_re = esc(head, seen)
    return re.compile(head_re + "(?P<post>.*)" + esc(tail, seen), re.DOTALL)


def template_span(task: Task, query: str) -> tuple[tuple[int, int], str]:
    """Post span (and aspect) of a query written with the task's template; ((-1, -1), "") if not."""
    m = _template_regex(task.query_template).fullmatch(query)
    if m:
        return (m.start("post"), m.end("post")), (m.groupdict().get("aspect") or "")
    # Same opening but a reworded question: the post ends at the last closing marker
    # (the template's text after {post} up to its first colon, e.g. `" 问题：` or `" Question:`).
    head, _, tail = task.query_template.partition("{post}")
    marker = re.split(r"(?<=[:：])", tail.split("{aspect}")[0], maxsplit=1)[0]
    if "{aspect}" in head or not marker or not query.startswith(head):
        return (-1, -1), ""
    end = query.rfind(marker)
    return ((len(head), end) if end >= len(head) else (-1, -1)), ""


def _find_aspect(task: Task, text: str) -> str:
    low = text.lower()
    hits = [a for a in task.aspects if a.lower() in low]
    return max(hits, key=len) if hits else ""


def query_aspect(ctx: Ctx, line: int, name: str, query: str, task: Task) -> str:
    """The aspect an aspect task's query asks about ("" for other tasks)."""
    if not task.aspects:
        return ""
    (_, end), found = template_span(task, query)
    if found and found not in task.aspects:
        raise ctx.error("unknown aspect", line, name, f"{shown(found)}; expected one of {task.aspects}")
    found = found or _find_aspect(task, query[end:] if end >= 0 else query)
    if not found:
        raise ctx.error("cannot find the aspect", line, name, f"expected one of {task.aspects}")
    return found


class _ImhiCsv(Format):
    has_header = True
    columns: tuple[str, ...] = ()

    def detect(self, path: Path, first: str) -> bool:
        return set(self.columns) <= set(_cells(first, ","))

    def check_task(self, task: Task) -> None:
        if not task.label_sentences:
            raise ValueError(
                f"format {self.name} is IMHI data (one fixed label sentence per class); task "
                f"{task.name} is not an IMHI task"
            )

    def rows(self, text: str, path: Path):
        return delimited_rows(text, path, ",", has_header=True, one_line=False)

    def header(self, ctx: Ctx, header) -> None:
        map_header(ctx, header[1], header[0], self.columns)

    def field_at(self, line: str, offset: int, header: str) -> str:
        col = line[:offset].count(",")
        names = _cells(header, ",")
        return names[col] if col < len(names) else f"column {col + 1}"


class ImhiInstruction(_ImhiCsv):
    name = "imhi_instruction"
    columns = ("query", "gpt-3.5-turbo")

    def record(self, ctx: Ctx, line: int, n: int, row) -> dict:
        check_columns(ctx, line, row, ctx.ncols)
        task = ctx.task
        query, answer = ctx.get(row, "query"), ctx.get(row, "gpt-3.5-turbo")
        if not query.strip():
            raise ctx.error("empty query", line, "query")
        (start, end), _ = template_span(task, query)
        if start >= 0 and not visible(query[start:end]):
            raise ctx.error("empty post", line, "query")
        aspect = query_aspect(ctx, line, "query", query, task)
        labels = _gold(ctx, line, "gpt-3.5-turbo", answer, task)
        return record(task, str(n), query, answer, labels, aspect, (start, end))


class ImhiComplete(_ImhiCsv):
    name = "imhi_complete"
    columns = ("post", "question", "response")

    def record(self, ctx: Ctx, line: int, n: int, row) -> dict:
        check_columns(ctx, line, row, ctx.ncols)
        task = ctx.task
        post = ctx.get(row, "post").strip()
        post = post[len("Post:") :].strip() if post.startswith("Post:") else post
        if not visible(post):
            raise ctx.error("empty post", line, "post")
        question = ctx.get(row, "question").strip()
        question = question[len("Question:") :].strip() if question.startswith("Question:") else question
        aspect = ""
        if task.aspects:
            aspect = _find_aspect(task, question)
            if not aspect:
                raise ctx.error("cannot find the aspect", line, "question", f"expected one of {task.aspects}")
        head, marker, explanation = ctx.get(row, "response").partition(task.explanation_marker.strip())
        labels = _gold(ctx, line, "response", head, task)
        query, start, end = task.format_query(post, aspect)
        answer = task.format_answer(labels, explanation.strip() if marker else None)
        return record(task, str(n), query, answer, labels, aspect, (start, end))


def _json_obj(ctx: Ctx, line: int, row) -> dict:
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise ctx.error("malformed line", line, "json", f"expected an object, got {type(row).__name__}")
    return row


def _json_str(ctx: Ctx, line: int, obj: dict, name: str, required: bool = False) -> str:
    value = obj.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ctx.error("missing column" if value is None else "not a string", line, name)
    if required and not value.strip():
        raise ctx.error(f"empty {name}", line, name)
    return value


def _row_task(ctx: Ctx, line: int, obj: dict) -> Task:
    from mentalglm.tasks import TASKS, get_task

    name = obj.get("task")
    if name is None:
        if ctx.task is None:
            raise ctx.error("no task", line, "task", "the row names no task and none was given")
        return ctx.task
    if ctx.task is not None and name == ctx.task.name:
        return ctx.task
    if name not in ctx.tasks and name in TASKS:  # a built-in task's row of a shared file (C-IMHI's splits)
        return get_task(name, ctx.templates.get(name), TASKS)
    if name not in ctx.tasks:
        raise ctx.error("unknown task", line, "task", f"{shown(name)}; known: {', '.join(ctx.tasks)}")
    return get_task(name, ctx.templates.get(name), ctx.tasks)


def _row_id(obj: dict, line: int) -> str:
    return str(obj["id"]) if obj.get("id") not in (None, "") else str(line)


def _row_aspect(ctx: Ctx, line: int, obj: dict, task: Task, found: str, query_field: str, query: str) -> str:
    given = _json_str(ctx, line, obj, "aspect")
    if given and given not in task.aspects:
        raise ctx.error("unknown aspect", line, "aspect", f"{shown(given)}; expected one of {task.aspects}")
    return given or found or query_aspect(ctx, line, query_field, query, task)


class _JsonFormat(Format):
    needs_task = False

    def check_task(self, task: Task) -> None:
        pass

    def hub_rows(self, ds):
        yield from enumerate(ds, start=1)


class Alpaca(_JsonFormat):
    name = "alpaca"

    def detect(self, path: Path, first: str) -> bool:
        return path.suffix.lower() in (".json", ".jsonl")

    def rows(self, text: str, path: Path):
        if path.suffix.lower() == ".json":
            return json_array_rows(text, path)
        return jsonl_rows(text, path)

    def record(self, ctx: Ctx, line: int, n: int, row) -> dict:
        obj = _json_obj(ctx, line, row)
        task = _row_task(ctx, line, obj)
        instruction = _json_str(ctx, line, obj, "instruction", required=True)
        inp = _json_str(ctx, line, obj, "input")
        output = _json_str(ctx, line, obj, "output", required=True)
        if inp.strip():
            query = f"{instruction}\n{inp}"
            span, found = (len(instruction) + 1, len(query)), ""
        else:
            query = instruction
            span, found = template_span(task, query)
        aspect = _row_aspect(ctx, line, obj, task, found, "instruction", instruction) if task.aspects else ""
        if span[0] >= 0 and not visible(query[span[0] : span[1]]):
            raise ctx.error("empty post", line, "input" if inp.strip() else "instruction")
        labels = _gold(ctx, line, "output", output, task)
        return record(task, _row_id(obj, line), query, output, labels, aspect, span)


class Chat(_JsonFormat):
    name = "chat"

    def detect(self, path: Path, first: str) -> bool:
        return path.suffix.lower() == ".jsonl" and '"messages"' in first

    def rows(self, text: str, path: Path):
        return jsonl_rows(text, path)

    def record(self, ctx: Ctx, line: int, n: int, row) -> dict:
        obj = _json_obj(ctx, line, row)
        task = _row_task(ctx, line, obj)
        messages = obj.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ctx.error("missing column", line, "messages", "expected a list of {role, content}")
        roles = [m.get("role") for m in messages]
        if "user" not in roles:
            raise ctx.error("no user turn", line, "messages")
        u = roles.index("user")
        if "assistant" not in roles[u:]:
            raise ctx.error("no assistant turn after the user turn", line, "messages")
        a = roles.index("assistant", u)
        query, answer = messages[u].get("content"), messages[a].get("content")
        if not isinstance(query, str) or not query.strip():
            raise ctx.error("empty query", line, "messages", f"turn {u} (user)")
        if not isinstance(answer, str) or not answer.strip():
            raise ctx.error("empty answer", line, "messages", f"turn {a} (assistant)")
        span, found = template_span(task, query)
        if span[0] >= 0 and not visible(query[span[0] : span[1]]):
            raise ctx.error("empty post", line, "messages", f"turn {u} (user)")
        aspect = _row_aspect(ctx, line, obj, task, found, "messages", query) if task.aspects else ""
        labels = _gold(ctx, line, "messages", answer, task)
        return record(task, _row_id(obj, line), query, answer, labels, aspect, span)


def json_array_rows(text: str, path: Path):
    """Elements of a JSON list with the line each starts on (json.loads loses positions)."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    i = ws.match(text, 0).end()
    if not text.startswith("[", i):
        raise DataError(
            path,
            "not a JSON list",
            line=_line_at(text, i),
            field="json",
            detail="alpaca .json files hold a list of objects; use .jsonl for one object per line",
        )
    i = ws.match(text, i + 1).end()
    while i < len(text) and text[i] != "]":
        line = _line_at(text, i)
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(path, "invalid JSON", line=_line_at(text, e.pos), field="json", detail=e.msg) from None
        yield line, obj
        i = ws.match(text, i).end()


def _line_at(text: str, pos: int) -> int:
    return len(LINE_END.findall(text, 0, pos)) + 1


def jsonl_rows(text: str, path: Path):
    for i, line in enumerate(LINE_END.split(text), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, DataError(path, "invalid JSON", line=i, field="json", detail=e.msg)


# ----------------------------------------------------------------------------- the registry
SOS_VALUES = {"0": "低自杀风险", "1": "高自杀风险"}

# Detection order: the first entry whose `detect` accepts a file names its format.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Chat(),
        Alpaca(),
        TableFormat(
            name="sos_llm",
            id="id",
            text="comment",
            labels=LabelColumns(column="label", values=SOS_VALUES),
            detect_columns=("id", "label", "comment"),
            default_task="sos_hl_1k",
        ),
        TableFormat(
            name="socialcd",
            text="内容",
            labels=LabelColumns(multi_hot=True),
            detect_columns=("内容",),
            default_task="socialcd_3k",
        ),
        ImhiInstruction(),
        ImhiComplete(),
        _SosBert(
            name="sos_bert",
            header_row=False,
            columns=("is_high", "is_low", "text"),
            text="text",
            labels=LabelColumns(one_hot={"高自杀风险": "is_high", "低自杀风险": "is_low"}),
            default_task="sos_hl_1k",
        ),
        _Cp(
            name="cp",
            header_row=False,
            columns=("sentence", "labels"),
            text="sentence",
            quoting=False,
            labels=LabelColumns(column="labels", syntax="hierarchical"),
            default_task="cp",
        ),
    )
}
JSON_SUFFIXES = (".json", ".jsonl")
KNOWN_SUFFIXES = (".csv", ".tsv", ".txt", *JSON_SUFFIXES)


def get_format(name_or_spec: Any, task_name: str = "") -> Format:
    """A registered format by name, or a table layout given inline (a task file's `format:` mapping)."""
    if isinstance(name_or_spec, Mapping):
        return table_format(task_name or "inline", name_or_spec)
    if name_or_spec not in FORMATS:
        raise ValueError(f"unknown format {name_or_spec!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name_or_spec]


def detect_format(path: Path, text: str) -> str:
    """Guess a registered format from the extension and the first line."""
    first = first_line(text)
    for fmt in FORMATS.values():
        if fmt.detect(path, first):
            return fmt.name
    raise DataError(
        path, "cannot detect the format", line=1, field="header", detail=f"pass fmt= one of {', '.join(FORMATS)}"
    )
