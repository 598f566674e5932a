"""Load a file (or Hub dataset) of any registered format into records with `tasks.RECORD_FIELDS`.

The format comes from the caller, else the task's own `format:`, else detection from the extension and header
(mentalglm/data/formats.py). Raw labelled tables get their query and answer from the task's templates. Bad
items raise a `DataError` naming file, line and field, or with on_error="skip" are skipped and counted in the
`LoadReport`. File-level problems (empty file, missing header, unknown format) always raise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mentalglm.data.formats import FORMATS, KNOWN_SUFFIXES, Ctx, Format, detect_format, first_line, get_format  # noqa: F401
from mentalglm.data.io import DataError, LoadReport, check_on_error, handle, read_text
from mentalglm.tasks import TASKS, Task, get_task


def load_records(
    task: Task | str | None,
    source: str | Path,
    fmt: str | None = None,
    *,
    on_error: str = "raise",
    report: LoadReport | None = None,
    hub_split: str = "train",
    templates: Mapping[str, Mapping] | None = None,
    tasks: Mapping[str, Task] | None = None,
) -> list[dict]:
    """Load one file (or Hub dataset) into records with exactly `tasks.RECORD_FIELDS`.

    `task` may be None for files whose format implies the task (a built-in raw format) and for alpaca/chat files
    whose rows carry a `task`. `tasks` is the registry rows may name (default: the built-in tasks);
    `templates` (task name -> template overrides) applies to tasks named by rows.
    """
    check_on_error(on_error)
    registry = TASKS if tasks is None else tasks
    templates = templates or {}
    if isinstance(task, str):
        task = get_task(task, templates.get(task), registry)
    chosen = get_format(fmt) if fmt is not None else None
    path = Path(source)
    if path.exists():
        try:
            text = read_text(path, on_error=on_error, report=report, newlines=False)
        except DataError as err:
            if err.offset is None:
                raise
            raise _name_bad_byte_field(err, path, chosen or _task_format(task)) from None
        fmt_obj = chosen or _task_format(task, path, text) or get_format(detect_format(path, text))
        rows = fmt_obj.rows(text, path)
    elif path.suffix.lower() in KNOWN_SUFFIXES or path.is_absolute() or str(source).startswith("."):
        # Looks like a file, not a Hub id: do not send a typo to the network.
        raise DataError(path, "file not found")
    else:
        fmt_obj = chosen or _task_format(task)
        if fmt_obj is None:
            raise ValueError(f"{source!r} is not a file; pass fmt= to read it as a Hub dataset")
        rows = _hub_rows(str(source), hub_split, fmt_obj)
    if task is None:
        task = _implied_task(fmt_obj, registry, templates)
    if task is None and fmt_obj.needs_task:
        raise ValueError(f"format {fmt_obj.name} needs a task")
    if task is not None:
        fmt_obj.check_task(task)
    ctx = Ctx(file=str(source), fmt=fmt_obj, task=task, tasks=registry, templates=templates)
    return _collect(ctx, rows, on_error, report)


def _task_format(task: Task | None, path: Path | None = None, text: str | None = None) -> Format | None:
    """The task's own format, unless the file is plainly in another one (a SOS-HL-1K task also reads
    `*_BERT.tsv` files, and any task reads alpaca/chat instruction files)."""
    if task is None or task.format is None:
        return None
    fmt = get_format(task.format, task.name)
    if path is None:
        return fmt
    try:
        detected = FORMATS[detect_format(path, text)]
    except DataError:
        return fmt
    if isinstance(task.format, Mapping):
        return fmt if detected.needs_task else None
    return fmt if detected.name == fmt.name else None


def _implied_task(fmt: Format, registry: Mapping[str, Task], templates: Mapping) -> Task | None:
    """The task a file of a release's raw layout holds, when the caller named none."""
    name = fmt.default_task
    if name is None or name not in registry:
        return None
    return get_task(name, templates.get(name), registry)


def _collect(ctx: Ctx, rows, on_error: str, report: LoadReport | None) -> list[dict]:
    records, seen = [], {}
    n, header = 0, False
    for line, row in rows:
        if line == 0:  # the header
            ctx.fmt.header(ctx, row)
            header = True
            continue
        n += 1  # data row number, bad rows included, so ids do not shift when skipping
        try:
            rec = ctx.fmt.record(ctx, line, n, row)
            key = (rec["task"], rec["id"], rec["aspect"])
            if key in seen:
                raise ctx.error("duplicate id", line, "id", f"id {rec['id']!r} already on line {seen[key]}")
            seen[key] = line
            records.append(rec)
        except DataError as err:
            handle(err, on_error, report)
    if header and n == 0:  # as empty as an empty file: 0 test items must not pass as a result
        raise DataError(Path(ctx.file), "a header and no rows", line=1)
    if report is not None:
        report.loaded[ctx.file] += len(records)
    return records


def _name_bad_byte_field(err: DataError, path: Path, fmt: Format | None) -> DataError:
    """Name the column an undecodable byte sits in (read_text knows only line and offset)."""
    raw = path.read_bytes()
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    text = raw[bom:].decode("utf-8", errors="replace")
    fmt = fmt or get_format(detect_format(path, text))
    start = raw.rfind(b"\n", 0, err.offset) + 1
    line = raw[start : err.offset].decode("utf-8", errors="replace")
    name = fmt.field_at(line, len(line), first_line(text))
    return DataError(err.file, err.reason, line=err.line, field=name, detail=err.detail, offset=err.offset)


def _hub_rows(source: str, split: str, fmt: Format):
    import datasets

    yield from fmt.hub_rows(datasets.load_dataset(source, split=split))
