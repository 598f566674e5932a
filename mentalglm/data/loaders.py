"""Load every supported raw or instruction format into records with `tasks.RECORD_FIELDS`.

Formats (`fmt`), autodetected from the extension and header when not given:

    sos_llm           SOS-HL-1K `*_LLM.csv`: TAB-separated, header `id label comment`, label 0/1
    sos_bert          SOS-HL-1K `*_BERT.tsv`: GBK, no header, columns `is_high is_low text`
    socialcd          SocialCD-3K TSV: 12 label columns (0/1) then `内容`
    cp                `sentence<TAB>labels`, labels like `认知歪曲,认知歪曲##放大和缩小`
    imhi_instruction  IMHI CSV `query, gpt-3.5-turbo`, kept as is
    imhi_complete     IMHI CSV `post, question, response`, rebuilt into the instruction form
    alpaca            JSON list or JSONL of `instruction, input, output` (+ optional `task`, `id`)
    chat              JSONL of `messages: [{role, content}, ...]` (+ optional `task`, `id`)

Raw labelled data (the first four) gets its query/answer from the task's templates. Bad items raise
a `DataError` naming file, line and field, or with on_error="skip" are skipped and counted in the
`LoadReport`. File-level problems (empty file, missing header, unknown format) always raise.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mentalglm.data.io import DataError, LoadReport, check_on_error, handle, read_text
from mentalglm.tasks import CP, SOCIALCD_3K, SOS_HL_1K, TASKS, Task, get_task

FORMATS = ("sos_llm", "sos_bert", "socialcd", "cp", "imhi_instruction", "imhi_complete", "alpaca", "chat")
# Raw formats belong to one task; used when the caller passes no task.
DEFAULT_TASK = {"sos_llm": SOS_HL_1K.name, "sos_bert": SOS_HL_1K.name, "socialcd": SOCIALCD_3K.name, "cp": CP.name}

SOS_LABELS = {"0": "低自杀风险", "1": "高自杀风险"}
SOS_LLM_COLUMNS = ("id", "label", "comment")
SOS_BERT_COLUMNS = ("is_high", "is_low", "text")
SOCIALCD_POST = "内容"
CP_COLUMNS = ("sentence", "labels")
CP_SEP = "##"
IMHI_INSTRUCTION_COLUMNS = ("query", "gpt-3.5-turbo")
IMHI_COMPLETE_COLUMNS = ("post", "question", "response")
IMHI_PREFIX = 'Consider this post: "'
IMHI_MARKER = '" Question:'  # the post ends at its LAST occurrence (posts may quote questions)
JSON_SUFFIXES = (".json", ".jsonl")
KNOWN_SUFFIXES = (".csv", ".tsv", ".txt", *JSON_SUFFIXES)

csv.field_size_limit(2**31 - 1)  # IMHI posts can be long


@dataclass
class _Ctx:
    """What a row parser needs: where it is, which task, and the header's column positions."""

    file: str
    fmt: str
    task: Task | None
    templates: Mapping
    cols: dict[str, int] = field(default_factory=dict)
    ncols: int | None = None

    def error(self, reason: str, line: int, field: str | None, detail: str = "") -> DataError:
        return DataError(self.file, reason, line=line, field=field, detail=detail)

    def get(self, row: list[str], name: str) -> str:
        return row[self.cols[name]]


# ----------------------------------------------------------------------------- entry point


def load_records(task: Task | str | None, source: str | Path, fmt: str | None = None, *, on_error: str = "raise",
                 report: LoadReport | None = None, hub_split: str = "train",
                 templates: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Load one file (or Hub dataset) into records with exactly `tasks.RECORD_FIELDS`.

    `task` may be None for raw formats (their task is implied) and for alpaca/chat files whose rows
    carry a `task`. `templates` (task name -> template overrides) applies to tasks named by rows.
    """
    check_on_error(on_error)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    templates = templates or {}
    if isinstance(task, str):
        task = get_task(task, templates.get(task))
    path = Path(source)
    if path.exists():
        try:
            text = read_text(path, on_error=on_error, report=report)
        except DataError as err:
            if err.offset is None:
                raise
            raise _name_bad_byte_field(err, path, fmt) from None
        fmt = fmt or detect_format(path, text)
        rows = _text_rows(fmt, text, path)
    elif path.suffix.lower() in KNOWN_SUFFIXES or path.is_absolute() or str(source).startswith("."):
        # Looks like a file, not a Hub id: do not send a typo to the network.
        raise DataError(path, "file not found")
    else:
        if fmt is None:
            raise ValueError(f"{source!r} is not a file; pass fmt= to read it as a Hub dataset")
        rows = _hub_rows(str(source), hub_split, fmt)
    if task is None and fmt in DEFAULT_TASK:
        task = get_task(DEFAULT_TASK[fmt], templates.get(DEFAULT_TASK[fmt]))
    if task is None and fmt not in ("alpaca", "chat"):
        raise ValueError(f"format {fmt} needs a task")
    _check_task(fmt, task)
    ctx = _Ctx(file=str(source), fmt=fmt, task=task, templates=templates)
    return _collect(ctx, rows, on_error, report)


def _collect(ctx: _Ctx, rows, on_error: str, report: LoadReport | None) -> list[dict]:
    parse_row = _ROW_PARSERS[ctx.fmt]
    records, seen = [], {}
    n = 0
    for line, row in rows:
        if line == 0:  # the header
            _HEADER_PARSERS[ctx.fmt](ctx, row)
            continue
        n += 1  # data row number, bad rows included, so ids do not shift when skipping
        try:
            rec = parse_row(ctx, line, n, row)
            key = (rec["task"], rec["id"])
            if key in seen:
                raise ctx.error("duplicate id", line, "id", f"id {rec['id']!r} already on line {seen[key]}")
            seen[key] = line
            records.append(rec)
        except DataError as err:
            handle(err, on_error, report)
    if report is not None:
        report.loaded[ctx.file] += len(records)
    return records


def _check_task(fmt: str, task: Task | None) -> None:
    need = {"sos_llm": SOS_HL_1K, "sos_bert": SOS_HL_1K, "socialcd": SOCIALCD_3K, "cp": CP}.get(fmt)
    if need is not None and task.labels != need.labels:
        raise ValueError(f"format {fmt} holds {need.name} labels; task {task.name} has other labels")
    if fmt.startswith("imhi") and task.group != "imhi":
        raise ValueError(f"format {fmt} is IMHI (English) data; task {task.name} is not an IMHI task")


def detect_format(path: Path, text: str) -> str:
    """Guess the format from the extension and the first line."""
    suffix = path.suffix.lower()
    first = text.lstrip("\n").split("\n", 1)[0]
    if suffix == ".json":
        return "alpaca"
    if suffix == ".jsonl":
        return "chat" if '"messages"' in first else "alpaca"
    tab = [c.strip() for c in first.split("\t")]
    comma = [c.strip() for c in next(csv.reader([first]))] if first else []
    if tab[: len(SOS_LLM_COLUMNS)] == list(SOS_LLM_COLUMNS):
        return "sos_llm"
    if SOCIALCD_POST in tab:
        return "socialcd"
    if set(IMHI_INSTRUCTION_COLUMNS) <= set(comma):
        return "imhi_instruction"
    if set(IMHI_COMPLETE_COLUMNS) <= set(comma):
        return "imhi_complete"
    if len(tab) == 3 and tab[0] in ("0", "1") and tab[1] in ("0", "1"):
        return "sos_bert"
    if len(tab) == 2 or suffix == ".txt":
        return "cp"
    raise DataError(path, "cannot detect the format", line=1, field="header",
                    detail=f"pass fmt= one of {', '.join(FORMATS)}")


def _name_bad_byte_field(err: DataError, path: Path, fmt: str | None) -> DataError:
    """Name the column an undecodable byte sits in (read_text knows only line and offset)."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    offset = err.offset - (len(path.read_bytes()) - len(raw))
    fmt = fmt or detect_format(path, raw.decode("utf-8", errors="replace").replace("\r\n", "\n"))
    if fmt in ("alpaca", "chat"):
        name = "json"
    else:
        delim = b"," if fmt.startswith("imhi") else b"\t"
        start = raw.rfind(b"\n", 0, offset) + 1
        col = raw[start:offset].count(delim)
        if fmt in ("sos_bert", "cp"):
            names = SOS_BERT_COLUMNS if fmt == "sos_bert" else CP_COLUMNS
        else:
            first = raw.split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()
            names = [c.strip() for c in (first.split("\t") if delim == b"\t" else next(csv.reader([first])))]
        name = names[col] if col < len(names) else f"column {col + 1}"
    return DataError(err.file, err.reason, line=err.line, field=name, detail=err.detail, offset=err.offset)


# ----------------------------------------------------------------------------- row sources
# A source yields (line, row): line 0 carries the header, data rows carry their 1-based file line.


def _text_rows(fmt: str, text: str, path: Path) -> Iterator[tuple[int, Any]]:
    if fmt in ("sos_llm", "sos_bert", "socialcd"):
        return _csv_rows(text, path, "\t", has_header=fmt != "sos_bert", one_line=True)
    if fmt in ("imhi_instruction", "imhi_complete"):
        return _csv_rows(text, path, ",", has_header=True, one_line=False)
    if fmt == "cp":
        return _plain_rows(text)
    if fmt == "alpaca" and path.suffix.lower() == ".json":
        return _json_array_rows(text, path)
    return _jsonl_rows(text, path)


def _csv_rows(text: str, path: Path, delimiter: str, has_header: bool, one_line: bool):
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    reader = csv.reader(iter(lines), delimiter=delimiter, strict=True)
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
            # TSV items never span lines: an unbalanced quote swallowed the lines after it.
            yield line, DataError(path, "malformed line", line=line, field="columns",
                                  detail=f"quoted field runs over {start - line} lines (unbalanced quote?)")
            continue
        yield line, row
    if not header_done:
        raise DataError(path, "missing header", line=1, field="header")


def _plain_rows(text: str):
    for i, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield i, line.split("\t")


def _json_array_rows(text: str, path: Path):
    """Elements of a JSON list with the line each starts on (json.loads loses positions)."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    i = ws.match(text, 0).end()
    if not text.startswith("[", i):
        raise DataError(path, "not a JSON list", line=text.count("\n", 0, i) + 1, field="json",
                        detail="alpaca .json files hold a list of objects; use .jsonl for one object per line")
    i = ws.match(text, i + 1).end()
    while i < len(text) and text[i] != "]":
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(path, "invalid JSON", line=text.count("\n", 0, e.pos) + 1, field="json",
                            detail=e.msg) from None
        yield line, obj
        i = ws.match(text, i).end()


def _jsonl_rows(text: str, path: Path):
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, DataError(path, "invalid JSON", line=i, field="json", detail=e.msg)


def _hub_rows(source: str, split: str, fmt: str):
    import datasets

    ds = datasets.load_dataset(source, split=split)
    if fmt in ("alpaca", "chat"):
        for i, row in enumerate(ds, start=1):
            yield i, row
        return
    cols = list(ds.column_names)
    if fmt not in ("sos_bert", "cp"):
        yield 0, (1, cols)
    for i, row in enumerate(ds, start=1):
        yield i, ["" if row[c] is None else str(row[c]) for c in cols]


# ----------------------------------------------------------------------------- headers


def _map_header(ctx: _Ctx, header: list[str], line: int, required) -> None:
    names = [h.strip().lstrip("\ufeff") for h in header]
    for name in required:
        if name not in names:
            raise ctx.error("missing column", line, name, f"header has {names}")
    ctx.cols = {name: i for i, name in enumerate(names)}
    ctx.ncols = len(names)


def _header_sos_llm(ctx, header):
    _map_header(ctx, header[1], header[0], SOS_LLM_COLUMNS)


def _header_socialcd(ctx, header):
    line, names = header[0], [h.strip() for h in header[1]]
    for name in names:
        if name != SOCIALCD_POST and name not in ctx.task.labels:
            raise ctx.error("label outside the label set", line, name, f"{ctx.task.name} labels: {ctx.task.labels}")
    _map_header(ctx, names, line, (*ctx.task.labels, SOCIALCD_POST))


def _header_imhi(required):
    def parse(ctx, header):
        _map_header(ctx, header[1], header[0], required)
    return parse


def _header_none(ctx, header):
    raise AssertionError("headerless format got a header")


# ----------------------------------------------------------------------------- rows


def _record(task: Task, id_: str, query: str, answer: str, labels: list[str], aspect: str = "",
            span: tuple[int, int] = (-1, -1)) -> dict:
    return {"task": task.name, "id": id_, "query": query, "answer": answer, "labels": labels,
            "aspect": aspect, "post_start": span[0], "post_end": span[1]}


def _raw_record(task: Task, id_: str, post: str, labels: list[str]) -> dict:
    labels = task.order_labels(labels)
    query, start, end = task.format_query(post)
    return _record(task, id_, query, task.format_answer(labels), labels, "", (start, end))


def _check_columns(ctx: _Ctx, line: int, row, expected: int) -> None:
    if isinstance(row, DataError):
        raise row
    if len(row) != expected:
        raise ctx.error("malformed line", line, "columns", f"expected {expected} columns, got {len(row)}")


def _post(ctx: _Ctx, line: int, value: str, name: str) -> str:
    post = value.strip()
    if not post:
        raise ctx.error("empty post", line, name)
    return post


def _bit(ctx: _Ctx, line: int, value: str, name: str) -> int:
    value = value.strip()
    if value not in ("0", "1"):
        raise ctx.error("label value is not 0/1", line, name, f"got {value!r}")
    return int(value)


def _row_sos_llm(ctx, line, n, row):
    _check_columns(ctx, line, row, ctx.ncols)
    id_ = ctx.get(row, "id").strip()
    if not id_:
        raise ctx.error("empty id", line, "id")
    label = ctx.get(row, "label").strip()
    if label not in SOS_LABELS:
        raise ctx.error("label outside the label set", line, "label", f"got {label!r}, expected 0 or 1")
    return _raw_record(ctx.task, id_, _post(ctx, line, ctx.get(row, "comment"), "comment"), [SOS_LABELS[label]])


def _row_sos_bert(ctx, line, n, row):
    _check_columns(ctx, line, row, len(SOS_BERT_COLUMNS))
    high, low = (_bit(ctx, line, row[i], SOS_BERT_COLUMNS[i]) for i in (0, 1))
    if high + low != 1:
        raise ctx.error("label outside the label set", line, "is_high",
                        f"is_high={high}, is_low={low}: exactly one must be 1")
    return _raw_record(ctx.task, str(n), _post(ctx, line, row[2], "text"), [SOS_LABELS[str(high)]])


def _row_socialcd(ctx, line, n, row):
    _check_columns(ctx, line, row, ctx.ncols)
    labels = [lab for lab in ctx.task.labels if _bit(ctx, line, ctx.get(row, lab), lab)]
    return _raw_record(ctx.task, str(n), _post(ctx, line, ctx.get(row, SOCIALCD_POST), SOCIALCD_POST), labels)


def _row_cp(ctx, line, n, row):
    _check_columns(ctx, line, row, len(CP_COLUMNS))
    post = _post(ctx, line, row[0], "sentence")
    return _raw_record(ctx.task, str(n), post, parse_cp_labels(ctx, line, row[1]))


def parse_cp_labels(ctx: _Ctx, line: int, value: str) -> list[str]:
    """`认知歪曲,认知歪曲##放大和缩小,情绪反应` -> leaves `父类-子类`, plus parents that have no child."""
    task = ctx.task
    parents, leaves = [], []
    for tok in re.split(r"[,，]", value):
        tok = tok.strip()
        if not tok:
            continue
        parent, sep, child = (s.strip() for s in tok.partition(CP_SEP))
        if parent not in task.parents:
            raise ctx.error("label outside the label set", line, "labels", f"unknown parent {parent!r} in {tok!r}")
        if not sep:
            parents.append(parent)
        elif child in task.parents[parent]:
            leaves.append(task.leaf(parent, child))
        else:
            raise ctx.error("label outside the label set", line, "labels",
                            f"unknown child {child!r} of {parent!r} in {tok!r}")
    with_child = {task.parent_of(leaf.split(task.child_sep, 1)[1]) for leaf in leaves}
    return leaves + [p for p in parents if p not in with_child]


def _row_imhi_instruction(ctx, line, n, row):
    _check_columns(ctx, line, row, ctx.ncols)
    task = ctx.task
    query, answer = ctx.get(row, "query"), ctx.get(row, "gpt-3.5-turbo")
    if not query.strip():
        raise ctx.error("empty query", line, "query")
    start, end = imhi_post_span(query)
    if start >= 0 and not query[start:end].strip():
        raise ctx.error("empty post", line, "query")
    aspect = _aspect(ctx, line, "query", query, TASKS.get(task.name, task))
    labels = _gold(ctx, line, "gpt-3.5-turbo", answer, task)
    return _record(task, str(n), query, answer, labels, aspect, (start, end))


def _row_imhi_complete(ctx, line, n, row):
    _check_columns(ctx, line, row, ctx.ncols)
    task = ctx.task
    post = ctx.get(row, "post").strip()
    post = post[len("Post:"):].strip() if post.startswith("Post:") else post
    if not post:
        raise ctx.error("empty post", line, "post")
    question = ctx.get(row, "question").strip()
    question = question[len("Question:"):].strip() if question.startswith("Question:") else question
    aspect = ""
    if task.aspects:
        aspect = _find_aspect(task, question)
        if not aspect:
            raise ctx.error("cannot find the aspect", line, "question", f"expected one of {task.aspects}")
    head, marker, explanation = ctx.get(row, "response").partition(task.explanation_marker.strip())
    labels = _gold(ctx, line, "response", head, task)
    query, start, end = task.format_query(post, aspect)
    answer = task.format_answer(labels, explanation.strip() if marker else None)
    return _record(task, str(n), query, answer, labels, aspect, (start, end))


def _row_alpaca(ctx, line, n, row):
    obj = _json_obj(ctx, line, row)
    task = _row_task(ctx, line, obj)
    instruction = _json_str(ctx, line, obj, "instruction", required=True)
    inp = _json_str(ctx, line, obj, "input")
    output = _json_str(ctx, line, obj, "output", required=True)
    if inp.strip():
        query = f"{instruction}\n{inp}"
        span = (len(instruction) + 1, len(query))
        aspect = _json_str(ctx, line, obj, "aspect") or _aspect(ctx, line, "instruction", instruction, task)
    else:
        query = instruction
        span, found = template_span(task, query)
        aspect = _json_str(ctx, line, obj, "aspect") or found or _aspect(ctx, line, "instruction", query, task)
    if span[0] >= 0 and not query[span[0]:span[1]].strip():
        raise ctx.error("empty post", line, "input" if inp.strip() else "instruction")
    labels = _gold(ctx, line, "output", output, task)
    return _record(task, _row_id(obj, line), query, output, labels, aspect, span)


def _row_chat(ctx, line, n, row):
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
    if span[0] >= 0 and not query[span[0]:span[1]].strip():
        raise ctx.error("empty post", line, "messages", f"turn {u} (user)")
    aspect = _json_str(ctx, line, obj, "aspect") or found or _aspect(ctx, line, "messages", query, task)
    labels = _gold(ctx, line, "messages", answer, task)
    return _record(task, _row_id(obj, line), query, answer, labels, aspect, span)


# ----------------------------------------------------------------------------- helpers


def _json_obj(ctx, line, row) -> dict:
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise ctx.error("malformed line", line, "json", f"expected an object, got {type(row).__name__}")
    return row


def _json_str(ctx, line, obj, name, required=False) -> str:
    value = obj.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ctx.error("missing column" if value is None else "not a string", line, name)
    if required and not value.strip():
        raise ctx.error(f"empty {name}", line, name)
    return value


def _row_task(ctx, line, obj) -> Task:
    name = obj.get("task")
    if name is None:
        if ctx.task is None:
            raise ctx.error("no task", line, "task", "the row names no task and none was given")
        return ctx.task
    if ctx.task is not None and name == ctx.task.name:
        return ctx.task
    if name not in TASKS:
        raise ctx.error("unknown task", line, "task", f"{name!r}; known: {', '.join(TASKS)}")
    return get_task(name, ctx.templates.get(name))


def _row_id(obj, line) -> str:
    return str(obj["id"]) if obj.get("id") not in (None, "") else str(line)


def _gold(ctx, line, name, answer: str, task: Task) -> list[str]:
    """Gold labels read off the label sentence (the text before the explanation marker)."""
    from mentalglm.eval.parsing import parse_labels

    marker = task.explanation_marker.strip()
    head = answer.split(marker, 1)[0] if marker else answer
    result = parse_labels(task, head)
    if not result.parsed:
        raise ctx.error("answer has no readable label", line, name, f"starts {answer[:60]!r}")
    return task.order_labels(result.labels)


def imhi_post_span(query: str) -> tuple[int, int]:
    """Span of the post in an IMHI query: after the prefix, up to the LAST `" Question:`."""
    if not query.startswith(IMHI_PREFIX):
        return -1, -1
    end = query.rfind(IMHI_MARKER)
    return (len(IMHI_PREFIX), end) if end >= len(IMHI_PREFIX) else (-1, -1)


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
    if "{post}" not in task.query_template:
        return (-1, -1), ""
    m = _template_regex(task.query_template).fullmatch(query)
    if m:
        return (m.start("post"), m.end("post")), (m.groupdict().get("aspect") or "")
    # Same opening but a reworded question: the post ends at the last closing marker
    # (the template's text after {post} up to its first colon, e.g. `" 问题：`).
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


def _aspect(ctx, line, name, query: str, task: Task) -> str:
    """The aspect an aspect task's query asks about ("" for other tasks)."""
    if not task.aspects:
        return ""
    _, found = template_span(task, query)
    if found and found not in task.aspects:
        raise ctx.error("unknown aspect", line, name, f"{found!r}; expected one of {task.aspects}")
    found = found or _find_aspect(task, query[query.rfind(IMHI_MARKER) + 1:] if IMHI_MARKER in query else query)
    if not found:
        raise ctx.error("cannot find the aspect", line, name, f"expected one of {task.aspects}")
    return found


_HEADER_PARSERS: dict[str, Callable] = {
    "sos_llm": _header_sos_llm, "sos_bert": _header_none, "socialcd": _header_socialcd, "cp": _header_none,
    "imhi_instruction": _header_imhi(IMHI_INSTRUCTION_COLUMNS), "imhi_complete": _header_imhi(IMHI_COMPLETE_COLUMNS),
    "alpaca": _header_none, "chat": _header_none,
}
_ROW_PARSERS: dict[str, Callable] = {
    "sos_llm": _row_sos_llm, "sos_bert": _row_sos_bert, "socialcd": _row_socialcd, "cp": _row_cp,
    "imhi_instruction": _row_imhi_instruction, "imhi_complete": _row_imhi_complete,
    "alpaca": _row_alpaca, "chat": _row_chat,
}
