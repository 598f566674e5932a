"""Where data lives: the bundled synthetic fixtures and the (optional) shared real data."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES_DIR = Path(__file__).resolve().parents[1] / "fixtures"
SHARED_DATA_ENV = "MENTALGLM_SHARED_DATA"


def shared_data_dir() -> Path | None:
    """`$MENTALGLM_SHARED_DATA`, else `../shared/data` beside the repo; None when absent (fresh clones)."""
    env = os.environ.get(SHARED_DATA_ENV)
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None
