"""The paper's tables beside your runs: `evaluate.py report=paper table=4 rows=[{name, path, paper}]`.

The published rows are data (conf/paper/mentalglm.yaml). Each user row reads a `metrics.json`, a run or
evaluation directory holding one (`test/metrics.json` of a train.py run), or a predictions / scored JSONL file
(scored here by the project's scorer); `paper` names the published row it is compared with, and the table
gains a delta line (yours minus the paper's, in points). Below the table, each of your rows states the data it
stands on and its n per column (as its run recorded them, or the row's own `data:`), so a delta on other data is
not read as a result. Written as paper_table<key>.md and .json.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mentalglm.errors import ConfigError
from mentalglm.fileio.atomic import dumps_json, write_files_atomic

log = logging.getLogger(__name__)
PAPER_FILE = Path(__file__).resolve().parents[2] / "conf" / "paper" / "mentalglm.yaml"
PARTS = ("F1", "P", "R")


def paper_tables(path: Path = PAPER_FILE) -> dict[str, dict]:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def _cell(value) -> tuple[float | None, ...]:
    """(F1, P, R) in %, None where the paper gives only F1."""
    if value is None:
        return (None, None, None)
    if isinstance(value, list):
        return tuple(value) + (None,) * (3 - len(value))
    return (float(value), None, None)


CLASSIFIER_SPLITS = ("val", "test", "expert")  # train_classifier.py's metrics.json: {split: {task key: ...}}


def _metrics_of(path: Path, out_dir: Path, name: str) -> dict:
    if path.is_dir():
        for candidate in (path / "metrics.json", path / "test" / "metrics.json"):
            if candidate.is_file():
                return json.loads(candidate.read_text(encoding="utf-8"))
        raise ConfigError(f"row {name!r}: {path} holds no metrics.json nor test/metrics.json")
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if path.suffix == ".jsonl":
        from mentalglm.reporting.writer import score_predictions_file

        return score_predictions_file(path, out_dir / f"scored_{_slug(name)}")
    raise ConfigError(f"row {name!r}: {path} is not a metrics.json, a run directory or a predictions JSONL file")


def _source_of(path: Path, metrics: Mapping) -> dict | None:
    """The data a row was scored on, as its run recorded it (metrics.json's or classifier.json's `data`)."""
    if isinstance(metrics.get("data"), Mapping):
        return dict(metrics["data"])
    classifier = path / "classifier.json" if path.is_dir() else None
    if classifier is not None and classifier.is_file():
        data = json.loads(classifier.read_text(encoding="utf-8")).get("data")
        return dict(data) if isinstance(data, Mapping) else None
    return None


def _short(path: str) -> str:
    """A path as typed from the working directory where it lies under it."""
    here = Path.cwd()
    return str(Path(path).relative_to(here)) if Path(path).is_relative_to(here) else path


def data_line(row: Mapping, columns: Mapping[str, str]) -> str:
    """One line saying what a row of yours stands on: its data, split, files and n per column."""
    source, stated = row.get("source"), row.get("data")
    if stated:
        what = str(stated)
    elif source:
        shown = [t for t in source.get("files") or {} if any(k == t or k.startswith(f"{t}_") for k in columns)]
        files = sorted({_short(str(source["files"][t])) for t in shown if source["files"][t]})
        answers = f", {source['answers']} answers" if source.get("answers") else ""
        what = f"data={source.get('name')}{answers}, {source.get('split')} split: {', '.join(files) or '-'}"
    else:
        what = "data not recorded (give the row a `data:` field saying what it was scored on)"
    n = ", ".join(f"{title} {row['n'][k]}" for k, title in columns.items() if row["n"].get(k) is not None)
    return f"- **{row['name']}**: {what}; n = {n or '-'}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "row"


def user_row(metrics: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, tuple]:
    """(F1, P, R) in % per column from a metrics.json; a column the run did not score is (None, None, None)."""
    out = {}
    for key in columns:
        m = metrics.get(key)
        out[key] = (
            tuple(100 * m[k] if m.get(k) is not None else None for k in ("f1", "precision", "recall"))
            if isinstance(m, Mapping)
            else (None, None, None)
        )
    return out


def _fmt(cell: tuple, parts: int) -> str:
    shown = [f"{v:.2f}" if v is not None else "-" for v in cell[:parts]]
    return "/".join(shown) if any(v is not None for v in cell[:parts]) else "-"


def _delta(ours: tuple, theirs: tuple, parts: int) -> str:
    pairs = list(zip(ours[:parts], theirs[:parts]))
    if not any(a is not None and b is not None for a, b in pairs):
        return "-"
    return "/".join(f"{a - b:+.2f}" if a is not None and b is not None else "-" for a, b in pairs)


def paper_report(table: str, rows: list, out_dir: str | Path, paper_file: Path = PAPER_FILE) -> dict:
    tables = paper_tables(paper_file)
    table = table if str(table).startswith("table") else f"table{table}"  # table=4 is table4
    if table not in tables:
        raise ConfigError(f"table={table!r} is unknown; the paper's tables here: {', '.join(tables)}")
    spec = tables[table]
    columns, published = spec["columns"], {r["method"]: r for r in spec["rows"]}
    parts = 3 if any(isinstance(r.get(k), list) for r in spec["rows"] for k in columns) else 1
    out_dir = Path(out_dir)
    if not isinstance(rows, list) or not rows:
        raise ConfigError("report=paper needs rows=[{name: ..., path: ..., paper: <a published row>}]")
    yours = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or not row.get("name") or not row.get("path"):
            raise ConfigError(f"rows[{i}]: give name and path (and optionally paper: the published row to compare)")
        name, path = str(row["name"]), Path(str(row["path"]))
        if not path.exists():
            raise ConfigError(f"rows[{i}].path: {path} does not exist")
        paper = row.get("paper")
        if paper is not None and paper not in published:
            raise ConfigError(f"rows[{i}].paper: {paper!r} is not a row of {table}; its rows: {', '.join(published)}")
        metrics = _metrics_of(path, out_dir, name)
        source = _source_of(path, metrics)
        split = row.get("split")
        if split is None and set(metrics) and set(metrics) <= set(CLASSIFIER_SPLITS):
            split = "test" if "test" in metrics else next(iter(metrics))  # a train_classifier.py run
        if split is not None:
            if split not in metrics:
                raise ConfigError(f"rows[{i}].split: {path} has no split {split!r} (it has {', '.join(metrics)})")
            metrics = metrics[split]
        cells = user_row(metrics, columns)
        if all(c[0] is None for c in cells.values()):
            raise ConfigError(f"rows[{i}]: {path} scores none of {table}'s columns ({', '.join(columns)})")
        n = {k: metrics[k].get("n") for k in columns if isinstance(metrics.get(k), Mapping)}
        yours.append(
            {
                "name": name,
                "path": str(path),
                "paper": paper,
                "param": row.get("param", ""),
                "cells": cells,
                "n": n,
                "data": row.get("data"),
                "source": source,
            }
        )

    unit = "F1/P/R" if parts == 3 else "F1"
    head = ["Method", "Param", *(f"{title} ({unit})" for title in columns.values())]
    lines = [f"# {spec['title']}", "", "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(columns)]
    for method, r in published.items():
        cells = [_fmt(_cell(r.get(k)), parts) for k in columns]
        lines.append(f"| {method} (paper) | {r.get('param', '')} | " + " | ".join(cells) + " |")
    for y in yours:
        lines.append(
            f"| **{y['name']}** | {y['param']} | " + " | ".join(_fmt(y["cells"][k], parts) for k in columns) + " |"
        )
        if y["paper"]:
            theirs = published[y["paper"]]
            deltas = [_delta(y["cells"][k], _cell(theirs.get(k)), parts) for k in columns]
            lines.append(f"| Δ {y['name']} − {y['paper']} | | " + " | ".join(deltas) + " |")
    lines += ["", "Rows marked (paper) are the published figures; Δ is yours minus the paper's row, in points.", ""]
    lines += [
        "Your rows stand on this data (n: items per column). The paper's rows are on its own test sets: a Δ on "
        "other data, or on a few dozen items, is not a result.",
        "",
        *(data_line(y, columns) for y in yours),
        "",
    ]
    result = {
        "table": table,
        "title": spec["title"],
        "columns": columns,
        "rows": [{**y, "cells": {k: list(v) for k, v in y["cells"].items()}} for y in yours],
    }
    write_files_atomic(
        {out_dir / f"paper_{table}.md": "\n".join(lines), out_dir / f"paper_{table}.json": dumps_json(result)}
    )
    log.info("%s\n(written to %s)", "\n".join(lines), out_dir / f"paper_{table}.md")
    return result


def table3_reference(columns: list[tuple[str, str]], paper_file: Path = PAPER_FILE) -> str:
    """The paper's Table 3 rows, for ablation.md, in the sweep's columns (those the paper has)."""
    spec = paper_tables(paper_file)["table3"]
    shown = [(key, title) for key, title in columns if key in spec["columns"]]
    if not shown:
        return ""
    head = "| method | " + " | ".join(title for _, title in shown) + " |"
    body = [
        f"| {r['method']} | " + " | ".join(_fmt(_cell(r.get(key)), 1) for key, _ in shown) + " |" for r in spec["rows"]
    ]
    return "\n".join(["## The paper's Table 3 (test F1, %)", "", head, "|---|" + "---:|" * len(shown), *body, ""])
