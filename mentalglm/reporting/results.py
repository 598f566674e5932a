"""Results tables (shaped like the paper's Table 4) and per-task charts."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from mentalglm.scoring.metrics import result_keys
from mentalglm.tasks import TASKS, Task

# Families matplotlib may find on a machine that has Chinese fonts; the first one present is used.
CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "Heiti SC",
    "AR PL UMing CN",
    "AR PL UKai CN",
    "Droid Sans Fallback",
    "Noto Sans CJK JP",
    "Noto Serif CJK SC",
)


def display_names(tasks: Mapping[str, Task]) -> dict[str, str]:
    """Metric key -> the name a table shows (a hierarchical task's keys get "(parent)" / "(child)")."""
    return {k: v for t in tasks.values() for k, v in t.metric_display_names.items()}


def key_tasks(tasks: Mapping[str, Task]) -> dict[str, Task]:
    """Metric key -> its task."""
    return {k: t for t in tasks.values() for k in t.metric_keys}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    align = [":---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]


def results_markdown(
    metrics: dict[str, dict],
    tasks: Mapping[str, Task] | None = None,
    title: str = "MentalGLM evaluation results",
    baseline: dict[str, float] | None = None,
    notice: str | None = None,
) -> str:
    """Markdown: a P/R/F1 table (Table 4 shape; with `baseline` {key: F1} a majority-class column), a table of the
    tasks' secondary metrics (IMHI: accuracy and weighted F1), per-aspect and per-label F1 (the per-label tables
    also map the indices used in charts when neither a CJK font nor display names exist)."""
    keys = result_keys(metrics)
    tasks = TASKS if tasks is None else tasks
    names = display_names(tasks)
    owner = key_tasks(tasks)
    lines = [f"# {title}", ""]
    if notice:
        lines += [notice, ""]
    if not keys:
        return "\n".join(lines + ["No predictions were scored.", ""])
    lines += [
        "Precision, recall and F1 in %: positive class for binary tasks, micro for multi-label tasks, "
        "weighted for multi-class tasks. Unparsed answers count as wrong.",
        "",
    ]
    base = {k: baseline[k] for k in keys if baseline and k in baseline}

    def name(key: str) -> str:
        return names.get(key, key)

    rows = [
        [name(k), _pct(m["precision"]), _pct(m["recall"]), _pct(m["f1"]), _pct(m["parse_rate"]), str(m["n"])]
        + ([_pct(base.get(k))] if base else [])
        for k, m in ((k, metrics[k]) for k in keys)
    ]
    if len(keys) > 1:
        mean = sum(metrics[k]["f1"] for k in keys) / len(keys)
        base_mean = [_pct(sum(base.values()) / len(base))] if base else []
        rows.append(["Mean", "", "", _pct(mean), "", ""] + base_mean)
    header = ["Task", "P", "R", "F1", "Parse rate", "n"] + (["Majority F1"] if base else [])
    if base:
        lines += ["Majority F1: always answering the most frequent training label set (the floor to beat).", ""]
    lines += _table(header, rows) + [""]
    cut = {name(k): metrics[k]["truncated"] for k in keys if metrics[k].get("truncated")}
    if cut:
        lines += [
            "Answers cut by the token cap (generation.max_new_tokens): "
            + ", ".join(f"{k} {v}" for k, v in cut.items())
            + "; those cut before their label sentence ended count as unparsed.",
            "",
        ]
    lines += read_by_lines(metrics, keys, owner, name)

    secondary = [k for k in keys if k in owner and owner[k].secondary_metrics]
    if secondary:
        columns = [m for m in ("accuracy", "f1_weighted") if any(m in owner[k].secondary_metrics for k in secondary)]
        titles = {"accuracy": "Accuracy", "f1_weighted": "Weighted F1"}
        lines += ["## Accuracy and weighted F1 (MentaLLaMA reports both for IMHI)", ""]
        lines += _table(
            ["Task", *(titles[c] for c in columns), "Parse rate", "n"],
            [
                [
                    name(k),
                    *(_pct(metrics[k].get(c)) for c in columns),
                    _pct(metrics[k]["parse_rate"]),
                    str(metrics[k]["n"]),
                ]
                for k in secondary
            ],
        ) + [""]

    # An unparsed answer on a negative item lowers no F1 of the positive class: the counts show it.
    binary = [k for k in keys if k in owner and owner[k].kind == "binary" and metrics[k].get("confusion")]
    if binary:
        lines += ["## Confusion counts (binary tasks; rows: gold, columns: predicted)", ""]
        rows = []
        for k in binary:
            labels = metrics[k]["confusion_labels"]
            for gold, counts in zip(labels, metrics[k]["confusion"]):
                rows.append([name(k), owner[k].label_display_name(gold), *map(str, counts)])
        width = len(metrics[binary[0]]["confusion_labels"])
        header = ["Task", "Gold", *(f"predicted {i + 1}" for i in range(width - 1)), "unparsed"]
        if len({tuple(metrics[k]["confusion_labels"]) for k in binary}) == 1:
            header = ["Task", "Gold", *(owner[binary[0]].label_display_name(lab) for lab in labels[:-1]), "unparsed"]
        lines += _table(header, rows, text_columns=2) + [""]

    aspect_keys = [k for k in keys if metrics[k].get("per_aspect")]
    if aspect_keys:
        lines += ["## Per-aspect F1 (positive class)", ""]
        lines += _table(
            ["Task", "Aspect", "F1"],
            text_columns=2,
            rows=[[name(k), a, _pct(f1)] for k in aspect_keys for a, f1 in metrics[k]["per_aspect"].items()],
        ) + [""]

    lines += ["## Per-label F1", "", "`#` is the label's index on the charts.", ""]
    for k in keys:
        per_label = metrics[k].get("per_label") or {}
        if per_label:
            task = owner.get(k)
            lines += [f"### {name(k)}", ""]
            lines += _table(
                ["#", "Label", "Name", "F1"],
                [
                    [str(i), lab, task.label_display_name(lab) if task else lab, _pct(f1)]
                    for i, (lab, f1) in enumerate(per_label.items())
                ],
                text_columns=3,
            )
            lines += [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- charts


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """A font family that renders Chinese, or None."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def _tick_labels(labels: list[str], task: Task | None = None) -> tuple[list[str], dict]:
    """Label names when they can be drawn, else the task's display names, else their indices (results.md maps
    them back)."""
    if all(lab.isascii() for lab in labels):
        return labels, {}
    font = cjk_font()
    if font is not None:
        return labels, {"fontfamily": font}
    shown = [task.label_display_name(lab) if task is not None else lab for lab in labels]
    return [name if name.isascii() else str(i) for i, name in enumerate(shown)], {}


def _slug(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", key)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _bar_chart(title: str, per_label: dict[str, float], task: Task | None) -> bytes:
    from matplotlib.figure import Figure

    names, font = _tick_labels(list(per_label), task)
    values = [100 * v for v in per_label.values()]
    fig = Figure(figsize=(max(4.0, 0.5 * len(names) + 1.5), 3.5))
    ax = fig.subplots()
    ax.bar(range(len(values)), values, color="#4C72B0")
    ax.set_xticks(
        range(len(values)),
        names,
        rotation=45 if len(names) > 4 else 0,
        ha="right" if len(names) > 4 else "center",
        **font,
    )
    ax.set_ylim(0, 100)
    ax.set_ylabel("F1 (%)")
    ax.set_title(f"{title}: per-label F1")
    for x, v in enumerate(values):
        ax.text(x, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    return _png(fig)


def _confusion_chart(title: str, confusion: list[list[int]], labels: list[str], task: Task | None) -> bytes:
    from matplotlib.figure import Figure

    rows, font = _tick_labels(labels[: len(confusion)], task)
    cols = rows + labels[len(confusion) :]  # the "unparsed" column
    size = max(3.5, 0.6 * len(cols) + 2)
    fig = Figure(figsize=(size, size * 0.85))
    ax = fig.subplots()
    image = ax.imshow(confusion, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", **font)
    ax.set_yticks(range(len(rows)), rows, **font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"{title}: confusion")
    peak = max((v for row in confusion for v in row), default=0)
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > peak / 2 else "black")
    return _png(fig)


def render_plots(
    metrics: dict[str, dict], out_dir: str | Path, tasks: Mapping[str, Task] | None = None
) -> dict[Path, bytes]:
    """Per-label F1 bar chart per metric key, and a confusion-matrix chart per single-label task: path -> PNG."""
    out_dir = Path(out_dir)
    tasks = TASKS if tasks is None else tasks
    names, owner = display_names(tasks), key_tasks(tasks)
    pngs: dict[Path, bytes] = {}
    with warnings.catch_warnings():
        # Missing-glyph warnings would repeat per tick; labels without a font are drawn as indices anyway.
        warnings.filterwarnings("ignore", message=".*[Gg]lyph.*")
        for key in result_keys(metrics):
            m = metrics[key]
            title, task = names.get(key, key), owner.get(key)
            if m.get("per_label"):
                pngs[out_dir / f"{_slug(key)}_per_label_f1.png"] = _bar_chart(title, m["per_label"], task)
            if m.get("confusion"):
                labels = m.get("confusion_labels") or [*m["per_label"], "unparsed"]
                pngs[out_dir / f"{_slug(key)}_confusion.png"] = _confusion_chart(title, m["confusion"], labels, task)
    return pngs


def save_plots(metrics: dict[str, dict], out_dir: str | Path, tasks: Mapping[str, Task] | None = None) -> list[Path]:
    from mentalglm.fileio.atomic import write_files_atomic

    return write_files_atomic(render_plots(metrics, out_dir, tasks))


def read_by_lines(metrics: Mapping[str, dict], keys: list[str], owner: Mapping, name) -> list[str]:
    """Which rule read each task's answers (scoring/parsing.py): shown when any answer was read by more than a
    stated label, so a reader sees how much of an F1 rests on options, negations or conclusions."""
    counts, seen = {}, set()
    for k in keys:
        task = owner[k].name if k in owner else k
        if metrics[k].get("read_by") and task not in seen:
            seen.add(task)
            counts[owner[k].display_name if k in owner else name(k)] = metrics[k]["read_by"]
    ways = sorted({w for c in counts.values() for w in c}, key=lambda w: (w.startswith("unparsed"), w != "stated", w))
    if not counts or ways == ["stated"]:
        return []
    rows = [[task, *(str(c.get(w, 0)) for w in ways)] for task, c in counts.items()]
    return [
        "## How the answers were read",
        "",
        "stated: the label as written; choice: an option list's stated choice; negation: a binary task's other "
        'label ("没有高自杀风险"); none: the none word; conclusion: after a conclusion marker (free parsing).',
        "",
        *_table(["Task", *ways], rows),
        "",
    ]
