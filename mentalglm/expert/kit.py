"""The expert-evaluation kit of the paper's §4.2.2 and §4.5: sample explanations, blind them, read the ratings back.

sample: items stratified by task in proportion to the split's size (the paper: 100 = 14 SOS-HL-1K, 36
SocialCD-3K, 50 CP), seeded; every model's answer to each sampled item is rated. blind: one shuffled CSV sheet
per rater, each answer behind a random code; key.csv maps the codes back to model, task and id.
aggregate: the filled sheets are checked (range, missing, repeated or unknown codes: errors naming the file and
row), unblinded and summarised: mean / median / std per dimension and model, inter-rater agreement per
dimension (quadratic-weighted Cohen's kappa for two raters, Krippendorff's alpha for any number), box plots.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mentalglm.errors import ConfigError
from mentalglm.fileio.atomic import read_csv

KEY_FIELDS = ("code", "model", "task", "id", "aspect")
ITEM_FIELDS = ("code", "task", "aspect", "post", "answer")
COMMENT = "comment"
OVERALL = "overall"


@dataclass(frozen=True)
class Dimension:
    name: str
    description: str
    low: int = 0
    high: int = 3

    def accepts(self, value: float) -> bool:
        """A rating is a whole number on the dimension's scale."""
        return float(value).is_integer() and self.low <= value <= self.high


def rubric_dimensions(rubric: Mapping[str, Mapping]) -> list[Dimension]:
    dims = []
    for name, spec in rubric.items():
        low, high = int(spec.get("min", 0)), int(spec.get("max", 3))
        if low >= high:
            raise ConfigError(f"rubric.{name}: min {low} is not below max {high}")
        dims.append(Dimension(name, str(spec.get("description", "")), low, high))
    if not dims:
        raise ConfigError("rubric is empty: name the dimensions the experts rate (rubric.NAME.description)")
    return dims


def stratified_counts(sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """`total` items split over tasks in proportion to `sizes`, by largest remainder (ties: the task order)."""
    available = sum(sizes.values())
    if total > available:
        raise ConfigError(f"size={total}, but the split holds only {available} items answered by every model")
    exact = {t: total * n / available for t, n in sizes.items()}
    counts = {t: math.floor(x) for t, x in exact.items()}
    order = sorted(sizes, key=lambda t: (-(exact[t] - counts[t]), list(sizes).index(t)))
    for t in order[: total - sum(counts.values())]:
        counts[t] += 1
    return counts


def draw_items(keys_by_task: Mapping[str, Sequence[tuple]], counts: Mapping[str, int], seed: int) -> list[tuple]:
    """A seeded sample of each task's item keys (sorted first, so the draw depends on the items, not file order)."""
    rng = random.Random(seed)
    chosen = []
    for task, keys in keys_by_task.items():
        n = counts.get(task, 0)
        if n > len(keys):
            raise ConfigError(f"per_task.{task}={n}, but only {len(keys)} of its items are answered by every model")
        chosen += rng.sample(sorted(keys), n)
    return chosen


RATER_NAME = re.compile(r"[^\W_][\w.-]{0,63}")  # letters (any script), digits, _ . -


def check_rater(name, key: str = "rater") -> None:
    """A rater's name becomes a file name (sheets/<rater>.csv): letters, digits, `_`, `.`, `-`, no path."""
    if not isinstance(name, str) or not RATER_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{key}: {name!r} is not a plain name (letters, digits, '_', '.', '-': it names the rater's sheet file)"
        )


def blind(
    items: Sequence[dict], models: Sequence[str], raters: Sequence[str], seed: int
) -> tuple[list[dict], dict[str, list[dict]]]:
    """(key rows, {rater: sheet rows}). `items` hold task, id, aspect, post and {model: answer} in `answers`."""
    if len(set(raters)) != len(raters) or not raters:
        raise ConfigError(f"raters must be distinct names, got {list(raters)}")
    for name in raters:
        check_rater(name, "raters")
    rng = random.Random(seed)
    codes: set[str] = set()
    key, rows = [], []
    for item in items:
        for model in models:
            code = f"{rng.randrange(16**6):06x}"
            while code in codes:
                code = f"{rng.randrange(16**6):06x}"
            codes.add(code)
            key.append({"code": code, "model": model, "task": item["task"], "id": item["id"], "aspect": item["aspect"]})
            rows.append(
                {"code": code, "task": item["task"], "aspect": item["aspect"], "post": item["post"]}
                | {"answer": item["answers"][model]}
            )
    sheets = {}
    for i, rater in enumerate(raters):
        mine = list(rows)
        random.Random(seed * 1000 + i).shuffle(mine)  # each rater sees their own order
        sheets[rater] = mine
    key.sort(key=lambda r: r["code"])
    return key, sheets


def sheet_fields(dims: Sequence[Dimension]) -> list[str]:
    return [*ITEM_FIELDS, *(d.name for d in dims), COMMENT]


def rubric_markdown(dims: Sequence[Dimension], notice: str) -> str:
    lines = ["# Rating rubric", "", notice, "", "Rate every answer on each dimension with a whole number:", ""]
    lines += [f"- **{d.name}** ({d.low}-{d.high}): {d.description}" for d in dims]
    lines += ["", "Leave no rating empty; the comment column is optional. Do not edit the `code` column."]
    return "\n".join(lines) + "\n"


def read_answers(path: Path, tasks: Mapping) -> dict[tuple, str]:
    """{(task, id, aspect): output} of a predictions JSONL file (evaluate.py's or predict.py's); errors name the
    file, line and field."""
    from mentalglm.data.io import DataError, json_lines, read_text

    try:
        text = read_text(path, newlines=False)
    except DataError as e:
        raise ConfigError(str(e)) from None
    out: dict[tuple, str] = {}
    for lineno, row in json_lines(path, text, ConfigError):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: a row is a JSON object")
        if row.get("task") not in tasks:
            raise ConfigError(f"{where}: field 'task' is {row.get('task')!r}, not a task of the data config")
        if row.get("id") in (None, ""):
            raise ConfigError(f"{where}: field 'id' is missing (it finds the item's post)")
        if not isinstance(row.get("output"), str):
            raise ConfigError(f"{where}: field 'output' (the model's answer) is missing or not text")
        k = (row["task"], str(row["id"]), row.get("aspect") or "")
        if k in out:
            raise ConfigError(f"{where}: task {k[0]} item {k[1]!r} is answered twice")
        out[k] = row["output"]
    return out


# ----------------------------------------------------------------------------- reading the ratings back
def read_csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    from mentalglm.data.io import DataError, read_text

    try:
        text = read_text(path, newlines=False)
    except DataError as e:
        raise ConfigError(str(e)) from None
    return read_csv(text)


def read_key(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise ConfigError(f"{path}: no key file (the one expert_eval.py action=sample wrote beside the sheets)")
    fields, rows = read_csv_rows(path)
    missing = [f for f in KEY_FIELDS if f not in fields]
    if missing:
        raise ConfigError(f"{path}: not a key file (no column {missing[0]!r})")
    return {r["code"]: r for r in rows}


def read_sheet(path: Path, key: Mapping[str, dict], dims: Sequence[Dimension]) -> dict[str, dict[str, int]]:
    """{code: {dimension: rating}} of one rater's filled sheet; any problem is an error naming the file and row
    (row 1 is the header, as a spreadsheet numbers it)."""
    fields, rows = read_csv_rows(path)
    missing = [f for f in ("code", *(d.name for d in dims)) if f not in fields]
    if missing:
        raise ConfigError(f"{path}: no column {missing[0]!r} (a sheet keeps the columns it was written with)")
    out: dict[str, dict[str, int]] = {}
    seen: dict[str, int] = {}
    for row_no, row in enumerate(rows, 2):
        code = (row.get("code") or "").strip()
        where = f"{path}: row {row_no}"
        if code not in key:
            raise ConfigError(f"{where}: code {code!r} is not in the key (an edited or pasted code?)")
        if code in seen:
            raise ConfigError(f"{where}: code {code!r} repeats row {seen[code]}")
        seen[code] = row_no
        ratings = {}
        for d in dims:
            raw = (row.get(d.name) or "").strip()
            if not raw:
                raise ConfigError(f"{where}: {d.name} is empty (rate every answer)")
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not d.accepts(value):
                raise ConfigError(f"{where}: {d.name}={raw!r} is not a whole number from {d.low} to {d.high}")
            ratings[d.name] = int(value)
        out[code] = ratings
    unrated = [c for c in key if c not in out]
    if unrated:
        raise ConfigError(f"{path}: {len(unrated)} coded answers of the key are missing (first: {unrated[0]!r})")
    return out


# ----------------------------------------------------------------------------- statistics
def quadratic_kappa(a: Sequence[int], b: Sequence[int], low: int, high: int) -> float | None:
    """Cohen's kappa with quadratic weights (scikit-learn); None when it is undefined (no variation at all)."""
    from sklearn.metrics import cohen_kappa_score

    if len(set(a) | set(b)) < 2:
        return None
    value = cohen_kappa_score(a, b, weights="quadratic", labels=list(range(low, high + 1)))
    return None if math.isnan(value) else float(value)


def krippendorff_alpha(ratings: Sequence[Sequence[float | None]], level: str = "ordinal") -> float | None:
    """Krippendorff's alpha of a raters x items matrix (None: a missing rating), with the `krippendorff` package."""
    import numpy as np

    try:
        import krippendorff
    except ImportError:
        raise ConfigError('agreement needs the krippendorff package: pip install -e ".[expert]"') from None
    data = np.array([[np.nan if v is None else v for v in row] for row in ratings], dtype=float)
    values = np.unique(data[~np.isnan(data)])
    if len(values) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))


def _stats(values: Sequence[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,  # sample standard deviation
        "n": len(values),
    }


def aggregate(
    key: Mapping[str, dict],
    sheets: Mapping[str, Mapping[str, Mapping[str, int]]],
    dims: Sequence[Dimension],
    overall_of: Sequence[str],
    level: str = "ordinal",
    order: Sequence[str] = (),
) -> dict:
    """Summary statistics per model and dimension (overall: the mean of `overall_of` per rating), per task, and
    inter-rater agreement per dimension over every coded answer. Models and tasks come in `order` (names), then
    alphabetically."""
    names = [d.name for d in dims] + ([OVERALL] if overall_of else [])
    unknown = [n for n in overall_of if n not in [d.name for d in dims]]
    if unknown:
        raise ConfigError(f"overall_of names {unknown}, which are not rubric dimensions")
    long = []
    for rater, ratings in sheets.items():
        for code, scores in ratings.items():
            row = {"rater": rater, **{k: key[code][k] for k in KEY_FIELDS}, **scores}
            if overall_of:
                row[OVERALL] = statistics.fmean(scores[n] for n in overall_of)
            long.append(row)
    by_model: dict[str, dict] = defaultdict(dict)
    by_task: dict[str, dict] = defaultdict(dict)
    rank = {name: i for i, name in enumerate(order)}

    def ordered(found: set[str]) -> list[str]:
        return sorted(found, key=lambda n: (rank.get(n, len(rank)), n))

    for model in ordered({r["model"] for r in long}):
        mine = [r for r in long if r["model"] == model]
        for name in names:
            by_model[model][name] = _stats([r[name] for r in mine])
        for task in ordered({r["task"] for r in mine}):
            theirs = [r for r in mine if r["task"] == task]
            by_task[model][task] = {name: statistics.fmean(r[name] for r in theirs) for name in names}
            by_task[model][task]["n"] = len(theirs)
    raters = list(sheets)
    codes = sorted(key)
    agreement = {}
    for d in dims:
        matrix = [[sheets[r][c][d.name] for c in codes] for r in raters]
        entry = {"raters": len(raters), "items": len(codes), "alpha": None, "kappa_quadratic": None}
        if len(raters) >= 2:
            entry["alpha"] = krippendorff_alpha(matrix, level)
        if len(raters) == 2:
            entry["kappa_quadratic"] = quadratic_kappa(matrix[0], matrix[1], d.low, d.high)
        agreement[d.name] = entry
    return {"models": dict(by_model), "tasks": dict(by_task), "agreement": agreement, "ratings": long, "level": level}


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def aggregate_markdown(report: Mapping, dims: Sequence[Dimension], task_names: Mapping[str, str], notice: str) -> str:
    names = [d.name for d in dims] + ([OVERALL] if any(OVERALL in m for m in report["models"].values()) else [])
    lines = ["# Expert evaluation", "", notice, ""]
    lines += ["Mean / median / std (sample) of every rating (raters x answers), per model and dimension.", ""]
    lines += ["| Model | " + " | ".join(names) + " | Ratings |", "|---|" + "---:|" * (len(names) + 1)]
    for model, stats in report["models"].items():
        cells = [f"{s['mean']:.2f} / {s['median']:.1f} / {s['std']:.2f}" for s in (stats[n] for n in names)]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {stats[names[0]]['n']} |")
    lines += ["", "## Mean per task", "", "| Model | Task | " + " | ".join(names) + " | Ratings |"]
    lines += ["|---|---|" + "---:|" * (len(names) + 1)]
    for model, tasks in report["tasks"].items():
        for task, means in tasks.items():
            cells = " | ".join(f"{means[n]:.2f}" for n in names)
            lines.append(f"| {model} | {task_names.get(task, task)} | {cells} | {means['n']} |")
    level = report["level"]
    lines += ["", "## Inter-rater agreement", ""]
    lines += [
        f"Krippendorff's alpha ({level}) over every coded answer; quadratic-weighted Cohen's kappa for two raters.",
        "",
    ]
    lines += ["| Dimension | Raters | Answers | Alpha | Kappa (quadratic) |", "|---|---:|---:|---:|---:|"]
    for name, a in report["agreement"].items():
        lines.append(f"| {name} | {a['raters']} | {a['items']} | {_num(a['alpha'])} | {_num(a['kappa_quadratic'])} |")
    return "\n".join(lines) + "\n"


def box_plot_png(report: Mapping, dims: Sequence[Dimension]) -> bytes:
    """One panel per dimension, a box per model (the paper's Fig. 3c / 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mentalglm.reporting.results import _png

    names = [d.name for d in dims] + ([OVERALL] if any(OVERALL in r for r in report["ratings"]) else [])
    models = list(report["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 1, 3.4), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        data = [[r[name] for r in report["ratings"] if r["model"] == m] for m in models]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(models) + 1), models, rotation=30, ha="right", fontsize=8)
        ax.set_title(name)
    high = max(d.high for d in dims)
    axes[0][0].set_ylim(min(d.low for d in dims) - 0.2, high + 0.2)
    fig.tight_layout()
    return _png(fig)
