"""The ablation table (the paper's Table 3) of a sweep, rebuilt from its finished job directories."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shlex
import statistics
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from mentalglm.errors import ConfigError
from mentalglm.fileio.atomic import write_files_atomic

log = logging.getLogger(__name__)

VARIANT_ORDER = {"s1": 0, "s2": 1, "full": 2}
FAILED = "failed.json"


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(
        (p for p in sweep_dir.iterdir() if (p / ".hydra" / "config.yaml").is_file()),
        key=lambda p: (len(p.name), p.name),
    )


def job_failure(job: Path) -> str | None:
    """Why a job failed, from its failed.json; None if it did not, or was rerun to the end since."""
    failed_file, metrics_file = job / FAILED, job / "test" / "metrics.json"
    if not failed_file.is_file():
        return None
    # A job rerun into its directory after a failure leaves the old failed.json behind: the newer file wins.
    if metrics_file.is_file() and metrics_file.stat().st_mtime_ns > failed_file.stat().st_mtime_ns:
        return None
    return json.loads(failed_file.read_text()).get("reason", "failed")


def read_job(job: Path) -> dict | None:
    """One job's row: its cell (model, variant), seed and test F1s, or why it failed; None if it does not test."""
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    row = {"job": job.name, "model": cfg.model.name, "seed": int(cfg.seed), "variant": chain_name(cfg)}
    metrics_file = job / "test" / "metrics.json"
    if (reason := job_failure(job)) is not None:
        row["failed"] = reason
    elif metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        row["columns"] = metric_columns(metrics)
        row["f1"] = {key: metrics[key]["f1"] for key, _ in row["columns"]}
    elif cfg.get("test") is False:
        return None  # trained without the test: nothing to put in the table, and nothing went wrong
    else:
        row["failed"] = "no test/metrics.json (job did not finish)"
    if "failed" in row:
        row["rerun"] = rerun_command(job)
    return row


def chain_name(cfg) -> str:
    """The name of a run's stage chain in reports: its variant, else `stage_<name>`s joined."""
    if cfg.get("variant"):
        return str(cfg.variant)
    return "+".join(f"stage_{name}" for name in cfg.get("chain") or ["two"])


def metric_columns(metrics: dict) -> list[tuple[str, str]]:
    """(metric key, column title) of a metrics.json, in its order; titles from its `tasks` block."""
    names = {k: v for t in (metrics.get("tasks") or {}).values() for k, v in t["metric_display_names"].items()}
    return [(k, f"{names.get(k, k)} F1") for k, v in metrics.items() if isinstance(v, dict) and "f1" in v]


def sweep_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """Every metric column of the jobs that finished, in the order they first appear."""
    columns: dict[str, str] = {}
    for r in rows:
        for key, title in r.get("columns", []):
            columns.setdefault(key, title)
    return list(columns.items())


_HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_\-./:~+@%^&*?!|]*")


def hydra_override(override: str) -> str:
    """`key=value` as Hydra's override grammar reads it back: a value with characters the grammar does not take
    unquoted (non-ASCII, spaces, quotes, commas, brackets) in single quotes."""
    key, sep, value = override.partition("=")
    if not sep or _HYDRA_PLAIN.fullmatch(value) or value[:1] in "[{'\"":
        return override
    return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rerun_command(job: Path) -> str:
    """The command that reruns a job into its own directory, after which the table can be rebuilt."""
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    args = [f"hydra.run.dir={job.resolve()}", *map(str, overrides)]
    return shlex.join(["python", "train.py", *map(hydra_override, args)])


def summarise(rows: list[dict], columns: list[tuple[str, str]]) -> list[dict]:
    """One line per (model, variant): mean and std over seeds of each F1 column, failures marked."""
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["model"], r["variant"])].append(r)
    out = []
    for (model, variant), runs in sorted(
        cells.items(), key=lambda kv: (kv[0][0], VARIANT_ORDER.get(kv[0][1], 9), kv[0][1])
    ):
        ok = [r for r in runs if "failed" not in r]
        line = {
            "model": model,
            "variant": variant,
            "seeds": sorted(r["seed"] for r in ok),
            "failed": [
                {"job": r["job"], "seed": r["seed"], "reason": r["failed"], "rerun": r["rerun"]}
                for r in runs
                if "failed" in r
            ],
        }
        for key, _ in columns:
            values = [100 * r["f1"][key] for r in ok if key in r["f1"]]
            line[key] = (
                (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None) if values else None
            )
        out.append(line)
    return out


def _cell(value) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def ablation_markdown(lines: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| model | variant | seeds | " + " | ".join(name for _, name in columns) + " |"
    rule = "|---|---|---|" + "---:|" * len(columns)
    body = []
    for ln in lines:
        cells = [_cell(ln[key]) for key, _ in columns] if ln["seeds"] else ["FAILED"] * len(columns)
        n_ok, n_failed = len(ln["seeds"]), len(ln["failed"])
        seeds = f"{n_ok} of {n_ok + n_failed} (failed: {n_failed})" if n_failed else str(n_ok)
        body.append(f"| {ln['model']} | {ln['variant']} | {seeds} | " + " | ".join(cells) + " |")
    text = (
        "# Ablation (test F1, %)\n\nMean over the seeds that finished; ± is the sample standard deviation.\n\n"
        + "\n".join([head, rule, *body])
        + "\n"
    )
    from mentalglm.reporting.paper import table3_reference

    reference = table3_reference(columns)
    if reference:
        text += "\n" + reference
    failures = [
        f"- {ln['model']} / {ln['variant']}, seed {f['seed']} (job {f['job']}): {_one_line(f['reason'])}\n"
        f"  rerun: `{f['rerun']}`"
        for ln in lines
        for f in ln["failed"]
    ]
    if failures:
        text += (
            "\n## Failed jobs\n\nAfter a rerun, rebuild this table with "
            "`python evaluate.py report=ablation sweep_dir=<this directory>`.\n\n" + "\n".join(failures) + "\n"
        )
    return text


def ablation_csv(lines: list[dict], columns: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "variant", "n_seeds", "n_failed"] + [f"{k}_{s}" for k, _ in columns for s in ("mean", "std")])
    for ln in lines:
        vals = []
        for key, _ in columns:
            mean, std = ln[key] if ln[key] is not None else (None, None)
            vals += ["" if mean is None else f"{mean:.4f}", "" if std is None else f"{std:.4f}"]
        w.writerow([ln["model"], ln["variant"], len(ln["seeds"]), len(ln["failed"])] + vals)
    return buf.getvalue()


def ablation_plot(lines: list[dict], columns: list[tuple[str, str]]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(lines))
    for i, ln in enumerate(lines):
        means = [ln[k][0] if ln[k] else 0.0 for k, _ in columns]
        errs = [ln[k][1] or 0.0 if ln[k] else 0.0 for k, _ in columns]
        xs = [j + i * width for j in range(len(columns))]
        ax.bar(xs, means, width, yerr=errs, label=f"{ln['model']} {ln['variant']}")
    ax.set_xticks(
        [j + width * (len(lines) - 1) / 2 for j in range(len(columns))],
        [n for _, n in columns],
        rotation=30 if len(columns) > 4 else 0,
        ha="right" if len(columns) > 4 else "center",
    )
    ax.set_ylabel("F1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def rebuild_ablation(sweep_dir: str | Path) -> dict:
    """Write ablation.md, ablation.csv and ablation.png into the sweep directory; return the summary."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep_dir={sweep_dir} does not exist")
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise ConfigError(f"sweep_dir={sweep_dir} holds no job directories (*/.hydra/config.yaml)")
    rows = [row for row in map(read_job, jobs) if row is not None]
    if not rows:
        raise ConfigError(f"no job in sweep_dir={sweep_dir} ran the test (test=false?): no ablation to build")
    columns = sweep_columns(rows)
    lines = summarise(rows, columns)
    write_files_atomic(
        {
            sweep_dir / "ablation.md": ablation_markdown(lines, columns),
            sweep_dir / "ablation.csv": ablation_csv(lines, columns),
            sweep_dir / "ablation.png": ablation_plot(lines, columns),
        }
    )
    n_failed = sum(len(ln["failed"]) for ln in lines)
    log.info("ablation of %d jobs (%d failed) -> %s", len(rows), n_failed, sweep_dir / "ablation.md")
    return {"lines": lines, "columns": columns, "jobs": len(rows), "failed": n_failed}
