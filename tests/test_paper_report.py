"""report=paper: the paper's tables (conf/paper/mentalglm.yaml) with the user's rows and their deltas."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mentalglm.errors import ConfigError
from mentalglm.reporting.paper import paper_report, paper_tables
from mentalglm.reporting.writer import score_predictions_file

FIXTURE = Path(__file__).parent / "fixtures" / "predictions_small.jsonl"


@pytest.fixture
def scored(tmp_path) -> Path:
    score_predictions_file(FIXTURE, tmp_path / "eval")
    return tmp_path / "eval"


def md_rows(text: str) -> dict[str, list[str]]:
    return {
        cells[0]: cells[1:]
        for cells in (
            [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")
        )
    }


def test_table_4_with_a_run_and_its_delta_to_the_paper(scored, tmp_path):
    metrics = json.loads((scored / "metrics.json").read_text())
    run = tmp_path / "run"
    (run / "test").mkdir(parents=True)
    shutil.copy(scored / "metrics.json", run / "test" / "metrics.json")  # a train.py run directory
    rows = [
        {"name": "from metrics.json", "path": str(scored / "metrics.json"), "paper": "MentalGLM-chat", "param": "9B"},
        {"name": "from a run", "path": str(run)},
        {"name": "from predictions", "path": str(FIXTURE)},
    ]
    result = paper_report("4", rows, tmp_path / "out")
    table = md_rows((tmp_path / "out" / "paper_table4.md").read_text())
    published = paper_tables()["table4"]["rows"]
    assert all(f"{r['method']} (paper)" in table for r in published)  # every published row, as data
    sos = metrics["sos_hl_1k"]
    ours = "/".join(f"{100 * sos[k]:.2f}" for k in ("f1", "precision", "recall"))
    assert table["**from metrics.json**"][:2] == ["9B", ours]
    chat = next(r for r in published if r["method"] == "MentalGLM-chat")["sos_hl_1k"]
    want = "/".join(f"{100 * sos[k] - v:+.2f}" for k, v in zip(("f1", "precision", "recall"), chat))
    assert table["Δ from metrics.json − MentalGLM-chat"][1] == want
    assert table["**from a run**"] == table["**from predictions**"] and table["**from a run**"][1] == ours
    assert "Δ from a run − MentalGLM-chat" not in table  # no paper row named: no delta
    assert [r["name"] for r in json.loads((tmp_path / "out" / "paper_table4.json").read_text())["rows"]] == [
        r["name"] for r in rows
    ]
    assert result["table"] == "table4"


def test_table_5_reads_cp_parent_and_child(scored, tmp_path):
    paper_report("table5", [{"name": "mine", "path": str(scored), "paper": "MentalGLM"}], tmp_path / "out")
    table = md_rows((tmp_path / "out" / "paper_table5.md").read_text())
    metrics = json.loads((scored / "metrics.json").read_text())
    assert table["**mine**"][1:] == [
        f"{100 * metrics['cp_parent']['f1']:.2f}",
        f"{100 * metrics['cp_child']['f1']:.2f}",
    ]
    assert table["Δ mine − MentalGLM"][1] == f"{100 * metrics['cp_parent']['f1'] - 69.07:+.2f}"


@pytest.mark.parametrize(
    "table, rows, message",
    [
        ("table9", [{"name": "a", "path": "."}], "table='table9' is unknown"),
        ("4", [], "report=paper needs rows="),
        ("4", [{"name": "a"}], "rows[0]: give name and path"),
        ("4", [{"name": "a", "path": "/no/such/metrics.json"}], "rows[0].path: /no/such/metrics.json does not exist"),
        ("4", [{"name": "a", "path": "METRICS", "paper": "MentalGLM-9000"}], "rows[0].paper: 'MentalGLM-9000'"),
        ("4", [{"name": "a", "path": "IMHI"}], "scores none of table4's columns"),
    ],
)
def test_bad_report_settings_name_the_row(scored, tmp_path, table, rows, message):
    imhi = tmp_path / "imhi.json"  # a stage-one evaluation: no C-IMHI column
    imhi.write_text(json.dumps({"dr": {"f1": 0.5, "precision": 0.5, "recall": 0.5}}))
    paths = {"METRICS": str(scored / "metrics.json"), "IMHI": str(imhi)}
    rows = [{k: paths.get(v, v) for k, v in r.items()} for r in rows]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        paper_report(table, rows, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("paper_*"))


@pytest.mark.slow
def test_report_paper_cli(run_cli, scored, tmp_path):
    out = tmp_path / "cli"
    rows = f"rows=[{{name: mine, path: '{scored / 'metrics.json'}', paper: GPT-4 few-shot}}]"
    run_cli("evaluate.py", "report=paper", "table=4", rows, f"output_dir={out}")
    assert "Δ mine − GPT-4 few-shot" in (out / "paper_table4.md").read_text()
    bad = run_cli("evaluate.py", "report=paper", "table=4", rows.replace("GPT-4", "GPT-5"), check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: rows[0].paper: 'GPT-5")


def test_table_s1_reads_a_classifier_run_by_split(tmp_path):
    """train_classifier.py's metrics.json holds one block per split: the test split by default, `split:` picks."""

    def prf(f1):
        return {"f1": f1, "precision": f1, "recall": f1}

    doc = {
        split: {"sos_hl_1k": prf(v), "socialcd_3k": prf(v), "cp_parent": prf(0.9), "cp_child": prf(v)}
        for split, v in (("test", 0.99), ("expert", 0.9))
    }
    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "metrics.json").write_text(json.dumps(doc))
    rows = [
        {"name": "test", "path": str(tmp_path / "clf"), "paper": "Chinese MentalBERT (test set)"},
        {"name": "expert", "path": str(tmp_path / "clf"), "split": "expert"},
    ]
    paper_report("S1", rows, tmp_path / "out")
    table = md_rows((tmp_path / "out" / "paper_tableS1.md").read_text())
    assert table["**test**"][1:] == ["99.00/99.00/99.00"] * 3 and table["**expert**"][3] == "90.00/90.00/90.00"
    assert table["Δ test − Chinese MentalBERT (test set)"][3] == "+0.53/-0.81/+1.84"  # CP: the child level
    with pytest.raises(ConfigError, match=r"rows\[0\].split: .* has no split 'val'"):
        paper_report("S1", [{"name": "v", "path": str(tmp_path / "clf"), "split": "val"}], tmp_path / "bad")
