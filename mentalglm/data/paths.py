"""Where data lives: the bundled synthetic fixtures and the (optional) real data folder."""

from __future__ import annotations

import os
from pathlib import Path

from mentalglm.fixtures import FIXTURES_DIR  # noqa: F401  (re-exported)

REPO_ROOT = Path(__file__).resolve().parents[2]
# The one environment variable for the data folder (conf/paths/default.yaml reads it too).
DATA_ENV = "MENTALGLM_DATA"
SHARED_DATA_ENV = DATA_ENV


def shared_data_dir() -> Path | None:
    """`$MENTALGLM_DATA`, else `../shared/data` beside the repo; None when absent (fresh clones)."""
    env = os.environ.get(DATA_ENV)
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None
