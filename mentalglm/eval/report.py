"""Results tables (shaped like the paper's Table 4) and per-task charts."""

from __future__ import annotations

import io
import re
import warnings
from functools import lru_cache
from pathlib import Path

from mentalglm.eval.atomic import write_atomic
from mentalglm.eval.metrics import result_keys
from mentalglm.tasks import TASKS

DISPLAY_NAMES = {
    "sos_hl_1k": "SOS-HL-1K", "socialcd_3k": "SocialCD-3K", "cp_parent": "CP (parent)", "cp_child": "CP (child)",
    "dr": "DR", "dreaddit": "Dreaddit", "loneliness": "Loneliness", "swmh": "SWMH", "t_sid": "T-SID",
    "sad": "SAD", "cams": "CAMS", "multiwd": "MultiWD", "irf": "IRF",
}
IMHI_KEYS = {k for t in TASKS.values() if t.group == "imhi" for k in t.metric_keys}
# Families matplotlib may find on a machine that has Chinese fonts; the first one present is used.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "AR PL UMing CN",
             "AR PL UKai CN", "Droid Sans Fallback", "Noto Sans CJK JP", "Noto Serif CJK SC")


def _name(key: str) -> str:
    return DISPLAY_NAMES.get(key, key)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    align = [":---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]


def results_markdown(metrics: dict[str, dict], title: str = "MentalGLM evaluation results",
                     baseline: dict[str, float] | None = None) -> str:
    """Markdown: a P/R/F1 table (Table 4 shape; with `baseline` {key: F1} a majority-class column), an IMHI accuracy / weighted-F1 table, per-aspect and
    per-label F1 (the per-label tables also map the indices used in charts when no CJK font exists)."""
    keys = result_keys(metrics)
    lines = [f"# {title}", ""]
    if not keys:
        return "\n".join(lines + ["No predictions were scored.", ""])
    lines += ["Precision, recall and F1 in %: positive class for binary tasks, micro for multi-label tasks, "
              "weighted for IMHI multi-class tasks. Unparsed answers count as wrong.", ""]
    base = {k: baseline[k] for k in keys if baseline and k in baseline}
    rows = [[_name(k), _pct(m["precision"]), _pct(m["recall"]), _pct(m["f1"]), _pct(m["parse_rate"]), str(m["n"])]
            + ([_pct(base.get(k))] if base else []) for k, m in ((k, metrics[k]) for k in keys)]
    if len(keys) > 1:
        mean = sum(metrics[k]["f1"] for k in keys) / len(keys)
        base_mean = [_pct(sum(base.values()) / len(base))] if base else []
        rows.append(["Mean", "", "", _pct(mean), "", ""] + base_mean)
    header = ["Task", "P", "R", "F1", "Parse rate", "n"] + (["Majority F1"] if base else [])
    if base:
        lines += ["Majority F1: always answering the most frequent training label set (the floor to beat).", ""]
    lines += _table(header, rows) + [""]

    imhi = [k for k in keys if k in IMHI_KEYS]
    if imhi:
        lines += ["## IMHI (MentaLLaMA metrics)", ""]
        lines += _table(["Task", "Accuracy", "Weighted F1", "Parse rate", "n"],
                        [[_name(k), _pct(metrics[k].get("accuracy")), _pct(metrics[k].get("f1_weighted")),
                          _pct(metrics[k]["parse_rate"]), str(metrics[k]["n"])] for k in imhi]) + [""]

    aspect_keys = [k for k in keys if metrics[k].get("per_aspect")]
    if aspect_keys:
        lines += ["## Per-aspect F1 (positive class)", ""]
        lines += _table(["Task", "Aspect", "F1"], text_columns=2, rows=[[_name(k), a, _pct(f1)] for k in aspect_keys
                                                   for a, f1 in metrics[k]["per_aspect"].items()]) + [""]

    lines += ["## Per-label F1", "", "`#` is the label's index on the charts.", ""]
    for k in keys:
        per_label = metrics[k].get("per_label") or {}
        if per_label:
            lines += [f"### {_name(k)}", ""]
            lines += _table(["#", "Label", "F1"], [[str(i), lab, _pct(f1)] for i, (lab, f1) in enumerate(per_label.items())],
                            text_columns=2)
            lines += [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- charts


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """A font family that renders Chinese, or None."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def _tick_labels(labels: list[str]) -> tuple[list[str], dict]:
    """Label names when they can be drawn, else their indices (results.md maps them back)."""
    if all(lab.isascii() for lab in labels):
        return labels, {}
    font = cjk_font()
    if font is not None:
        return labels, {"fontfamily": font}
    return [str(i) if not lab.isascii() else lab for i, lab in enumerate(labels)], {}


def _slug(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", key)


def _save_figure(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return write_atomic(path, buf.getvalue())


def _bar_chart(key: str, per_label: dict[str, float], path: Path) -> Path:
    from matplotlib.figure import Figure

    names, font = _tick_labels(list(per_label))
    values = [100 * v for v in per_label.values()]
    fig = Figure(figsize=(max(4.0, 0.5 * len(names) + 1.5), 3.5))
    ax = fig.subplots()
    ax.bar(range(len(values)), values, color="#4C72B0")
    ax.set_xticks(range(len(values)), names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center", **font)
    ax.set_ylim(0, 100)
    ax.set_ylabel("F1 (%)")
    ax.set_title(f"{_name(key)}: per-label F1")
    for x, v in enumerate(values):
        ax.text(x, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    return _save_figure(fig, path)


def _confusion_chart(key: str, confusion: list[list[int]], labels: list[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    rows, font = _tick_labels(labels[: len(confusion)])
    cols = rows + labels[len(confusion):]  # the "unparsed" column
    size = max(3.5, 0.6 * len(cols) + 2)
    fig = Figure(figsize=(size, size * 0.85))
    ax = fig.subplots()
    image = ax.imshow(confusion, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", **font)
    ax.set_yticks(range(len(rows)), rows, **font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"{_name(key)}: confusion")
    peak = max((v for row in confusion for v in row), default=0)
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > peak / 2 else "black")
    return _save_figure(fig, path)


def save_plots(metrics: dict[str, dict], out_dir: str | Path) -> list[Path]:
    """Per-label F1 bar chart per metric key, and a confusion-matrix chart per single-label task."""
    out_dir = Path(out_dir)
    paths = []
    with warnings.catch_warnings():
        # Missing-glyph warnings would repeat per tick; labels without a font are drawn as indices anyway.
        warnings.filterwarnings("ignore", message=".*[Gg]lyph.*")
        for key in result_keys(metrics):
            m = metrics[key]
            if m.get("per_label"):
                paths.append(_bar_chart(key, m["per_label"], out_dir / f"{_slug(key)}_per_label_f1.png"))
            if m.get("confusion"):
                labels = m.get("confusion_labels") or [*m["per_label"], "unparsed"]
                paths.append(_confusion_chart(key, m["confusion"], labels, out_dir / f"{_slug(key)}_confusion.png"))
    return paths
