"""Every teacher answer, appended and fsync'd the moment it arrives, keyed by what decides it.

The key is a hash of (kind, item id, prompt hash, teacher model, sampling settings): a rerun after a crash (or
SIGKILL) asks only for the answers it lacks, and changing the prompt template or the teacher re-asks only the
items whose key changed. The cache holds teacher answers (which may quote a post): it stays on this machine,
under paths.cache_dir, and is never logged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mentalglm.fileio.atomic import append_jsonl, read_partial


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="backslashreplace")).hexdigest()


def prompt_hash(messages: list[dict]) -> str:
    return sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True))


def cache_key(kind: str, item: str, prompt_sha: str, model: str, settings: dict) -> str:
    return sha256(json.dumps([kind, item, prompt_sha, model, settings], ensure_ascii=False, sort_keys=True))


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        for row in read_partial(self.path):  # a torn last line (killed mid-write) is dropped and cut off
            self.entries[row["key"]] = row

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, entry: dict) -> None:
        append_jsonl(self.path, entry, fsync=True)
        self.entries[entry["key"]] = entry
