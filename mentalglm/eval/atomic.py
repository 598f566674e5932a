"""Crash-safe file writes: a reader never sees a half-written metrics.json or report."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping


def write_atomic(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write to a temp file in the same directory, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace never crosses a filesystem boundary.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def append_jsonl(path: str | os.PathLike, rows: Mapping | Iterable[Mapping], fsync: bool = False) -> Path:
    """Append one row or many rows as JSON lines. Each line is written whole, in one write call.

    `fsync=True`: on disk when this returns, so a crash right after loses nothing written before it
    (a crash during the write can leave a torn last line: readers drop a line without its newline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(rows, Mapping):
        rows = [rows]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return path


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
