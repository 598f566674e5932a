"""Every teacher answer, appended and fsync'd the moment it arrives, keyed by what decides it.

The key is a hash of (kind, item id, prompt hash, teacher model, sampling settings): a rerun after a crash (or
SIGKILL) asks only for the answers it lacks, and changing the prompt template or the teacher re-asks only the
items whose key changed. The cache holds teacher answers (which may quote a post): it stays on this machine,
under paths.cache_dir, and is never logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from mentalglm.errors import ConfigError
from mentalglm.fileio.atomic import append_jsonl, complete_lines

log = logging.getLogger(__name__)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="backslashreplace")).hexdigest()


def prompt_hash(messages: list[dict]) -> str:
    return sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True))


def cache_key(kind: str, item: str, prompt_sha: str, model: str, settings: dict) -> str:
    return sha256(json.dumps([kind, item, prompt_sha, model, settings], ensure_ascii=False, sort_keys=True))


class ResponseCache:
    """The cache file of one run at a time: a second run on the same file is refused while the first holds its lock
    (each would ask every item again and append the same answers twice). Lines that cannot be read (a bad byte, a
    corrupt or foreign line) are skipped and counted, the rest reused; a torn last line is cut off."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.skipped = 0
        self._lock = _lock(self.path)
        for row in _read_lines(self.path, self):
            self.entries[row["key"]] = row
        if self.skipped:
            log.warning(
                "%s: %d unreadable lines skipped (their answers will be asked again), %d answers reused",
                self.path,
                self.skipped,
                len(self.entries),
            )

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, entry: dict) -> None:
        append_jsonl(self.path, entry, fsync=True)
        self.entries[entry["key"]] = entry


_LOCKS: dict[Path, object] = {}  # cache path -> the open lock file this process holds (kept until exit)


def _lock(path: Path):
    """An exclusive lock beside the cache (`<cache>.lock`), held by this process until it ends."""
    import fcntl

    key = path.resolve()
    if key in _LOCKS:
        return _LOCKS[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - held open: the lock lives with it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            f"teacher cache {path} is in use by another run (its lock is held): wait for that run to end, or give "
            "this one another teacher.cache"
        ) from None
    _LOCKS[key] = handle
    return handle


def _read_lines(path: Path, cache: ResponseCache) -> list[dict]:
    rows = []
    for line in complete_lines(path).split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("key"), str) and isinstance(row.get("content"), str):
            rows.append(row)
        else:
            cache.skipped += 1
    return rows
