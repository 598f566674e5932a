"""evaluate.py's progress on disk: every test batch's predictions are appended (fsync'd) to
predictions.partial.jsonl, so rerunning an interrupted evaluation with resume=true generates only the
items that are missing. The final predictions.jsonl / metrics.json are written whole at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L

from mentalglm.errors import ConfigError
from mentalglm.fileio.atomic import append_jsonl, read_partial, write_json_atomic  # noqa: F401 (read_partial: callers import it from here too)

log = logging.getLogger(__name__)

PARTIAL = "predictions.partial.jsonl"
PARTIAL_META = "predictions.partial.meta.json"


def fingerprint(settings: dict[str, Any], adapter: str | None) -> dict[str, Any]:
    """What decides the predictions: resumed rows must come from the same model, adapter, data and decoding."""
    digest = None
    if adapter:
        h = hashlib.sha256()
        with open(Path(adapter) / "adapter_model.safetensors", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    return {**settings, "adapter": str(adapter) if adapter else None, "adapter_sha256": digest}


class PartialPredictions(L.Callback):
    """Appends each test batch's new rows of `pl_module.test_predictions` to `out_dir/predictions.partial.jsonl`."""

    def __init__(self, out_dir: Path, meta: dict[str, Any]):
        self.path = Path(out_dir) / PARTIAL
        self.meta_path = Path(out_dir) / PARTIAL_META
        self.meta = json.loads(json.dumps(meta))  # as it reads back from disk (tuples -> lists)
        self.written = 0

    def start(self, resume: bool) -> list[dict]:
        """With `resume`, the rows an interrupted run of the same configuration wrote (refusing rows made by
        another configuration); without, none: any old partial file is discarded."""
        if not resume:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            old = json.loads(self.meta_path.read_text(encoding="utf-8")) if self.meta_path.is_file() else {}
            changed = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
            if changed:
                raise ConfigError(
                    f"{self.path} was written by an evaluation with other settings ({', '.join(changed)}"
                    "): rerun without resume=true to start a fresh evaluation"
                )
        write_json_atomic(self.meta_path, self.meta)
        return read_partial(self.path)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written = 0

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        rows = pl_module.test_predictions[self.written :]
        if rows:
            append_jsonl(self.path, rows, fsync=True)
        self.written = len(pl_module.test_predictions)

    def append(self, rows: list[dict]) -> None:
        """Rows generated outside the test loop (the vLLM backend)."""
        if rows:
            append_jsonl(self.path, rows, fsync=True)

    def finish(self) -> None:
        """The complete predictions.jsonl is written: the partial file has served its purpose."""
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
