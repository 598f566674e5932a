"""End-to-end: train.py through Hydra (subprocess) on the tiny model and the bundled fixtures."""

import json
from pathlib import Path

import pytest

from conftest import FAST_DEMO

pytestmark = pytest.mark.slow


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "outputs" / "train").glob("*/runs/*"))


def test_demo_full_variant(run_cli, tmp_path):
    run_cli("train.py", *FAST_DEMO)
    (run,) = run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["stages"]) == ["one", "two"]
    assert summary["stages"]["two"]["init_adapter"] == summary["stages"]["one"]["best_adapter"]
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert {"sos_hl_1k", "socialcd_3k", "cp_parent", "cp_child"} <= set(metrics)
    assert (run / "test" / "results.md").is_file() and (run / "test" / "predictions.jsonl").is_file()
