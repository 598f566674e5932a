"""Crash-safe file writes: a reader never sees a half-written metrics.json or report.

Files are written to a temporary name in the same directory and renamed into place, with the permissions
the user's umask gives a new file (a temporary file is created 0600, which would hide the result from a
group sharing the run directory). A disk that is full or read-only ends in one `OutputError`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from mentalglm.errors import ConfigError, OutputError

log = logging.getLogger(__name__)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _stage(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`; return its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace never crosses a filesystem boundary.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _encode(text: str | bytes) -> bytes:
    # A lone surrogate (a model can emit one) must not make a whole evaluation unwritable.
    return text.encode("utf-8", errors="backslashreplace") if isinstance(text, str) else text


_SURROGATE = re.compile("[\ud800-\udfff]")


def to_json(obj, indent: int | None = None) -> str:
    """JSON text that round-trips any Python string: lone surrogates are written as \\uXXXX escapes (valid JSON
    that json.loads reads back as the same character), not as bytes UTF-8 cannot hold."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def output_error(path: Path | str, error: OSError) -> OutputError:
    """The one message of a run that cannot write (a full or read-only disk), naming the path."""
    return OutputError(
        f"cannot write {path}: {error.strerror or error} (free space, or set output_dir= / hydra.run.dir= "
        "elsewhere; a train.py run continues where it stopped with resume=true)"
    )


def write_atomic(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write to a temp file in the same directory, then rename over `path` (atomic on POSIX)."""
    return write_files_atomic({path: text})[0]


def write_files_atomic(files: Mapping[str | os.PathLike, str | bytes]) -> list[Path]:
    """Write several files as one unit: each is staged under a temporary name first and only when all are on
    disk are they renamed into place, so a failure (full or read-only disk) leaves none of them written."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            path = Path(path)
            staged.append((_stage(path, _encode(text)), path))
    except OSError as e:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise output_error(Path(path), e) from None
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)  # nothing left after a failed rename (renamed ones are gone already)
    return [path for _, path in staged]


# A cell a spreadsheet would run as a formula (OWASP, CSV injection): `=HYPERLINK(...)` in a post or an answer can
# send the sheet's other cells off the machine when an expert opens it. Such a cell (and one already starting with
# the quote, so the round trip is exact) is written behind a `'`, which spreadsheets show as text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutral_cell(value):
    if isinstance(value, str) and value.startswith((*FORMULA_START, "'")):
        return "'" + value
    return value


def plain_cell(value: str) -> str:
    """The value neutral_cell was given (a cell read back from a sheet the project wrote)."""
    if len(value) > 1 and value[0] == "'" and value[1] in (*FORMULA_START, "'"):
        return value[1:]
    return value


def csv_text(fieldnames, rows: list[dict]) -> str:
    """RFC 4180 CSV for spreadsheets: CRLF row ends are what they expect, and they make the writer quote a teacher's
    answer holding a lone CR, which would otherwise end the row for every reader; formula-like cells neutralised
    (read back with read_csv)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows({k: neutral_cell(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def read_csv(text: str) -> tuple[list[str], list[dict]]:
    """(field names, rows) of a sheet csv_text wrote (and a person may have edited), cells as they were given."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = [{k: plain_cell(v) if isinstance(v, str) else v for k, v in row.items()} for row in reader]
    return list(reader.fieldnames or []), rows


def dumps_json(obj, indent: int | None = 2) -> str:
    return to_json(obj, indent) + "\n"


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return write_atomic(path, dumps_json(obj, indent))


def jsonl_text(rows: Iterable[Mapping]) -> str:
    return "".join(to_json(r) + "\n" for r in rows)


def append_jsonl(path: str | os.PathLike, rows: Mapping | Iterable[Mapping], fsync: bool = False) -> Path:
    """Append one row or many rows as JSON lines. Each line is written whole, in one write call.

    `fsync=True`: on disk when this returns, so a crash right after loses nothing written before it
    (a crash during the write can leave a torn last line: readers drop a line without its newline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(rows, Mapping):
        rows = [rows]
    data = _encode(jsonl_text(rows))
    try:
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except OSError as e:
        raise output_error(path, e) from None
    return path


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    return write_atomic(path, jsonl_text(rows))


def replace_dir_atomic(target: Path, write) -> None:
    """`write(tmp)` fills a temporary directory that then takes `target`'s place: a crash leaves the
    previous directory or the new one complete, never a half-written one under the final name."""
    import shutil

    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written directory behind
        raise
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def complete_lines(path: Path) -> bytes:
    """The complete lines of an appended file (b"" when there is none). A crash mid-append leaves a last line
    without its newline: it is dropped and cut off the file, so the next append starts on a clean line."""
    if not path.is_file():
        return b""
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) < len(raw):
        log.warning("%s: dropping a torn last line (%d bytes) left by the interruption", path, len(raw) - len(complete))
        os.truncate(path, len(complete))
    return complete


def read_partial(path: Path) -> list[dict]:
    """The rows written before an interruption (a torn last line cut off: `complete_lines`)."""
    complete = complete_lines(path)
    rows = []
    # Split on b"\n" only: str.splitlines() would also split inside outputs holding U+2028, U+0085 or \x1c.
    for lineno, line in enumerate(complete.decode("utf-8").split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{path}:{lineno}: not a JSON line ({e.msg}); delete the file to regenerate every prediction"
                ) from None
    return rows
