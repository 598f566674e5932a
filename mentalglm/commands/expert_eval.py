"""What expert_eval.py runs: the expert evaluation of explanations (paper §4.2.2, §4.5).

action=sample: a stratified, seeded sample of the split's items, each model's answer to each (predictions files
from evaluate.py or predict.py), written blind: sheets/<rater>.csv (shuffled, codes instead of model names),
key.csv (code -> model, task, id), rubric.md and sample.json.
action=rate: a local rating page for one rater (mentalglm/expert/rating.py); progress is kept in SQLite.
action=aggregate: the filled sheets checked, unblinded and summarised into results.md, metrics.json,
ratings.csv and box_plots.png (mentalglm/expert/kit.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mentalglm.errors import ConfigError
from mentalglm.expert import kit
from mentalglm.fileio.atomic import csv_text, dumps_json, write_files_atomic
from mentalglm.runtime.builders import build_tasks, load_splits, selected_tasks

log = logging.getLogger(__name__)

ACTIONS = ("sample", "rate", "aggregate")
NOTICE = (
    "Research use: the answers rated here are outputs of research models, screening aids and not diagnoses; "
    "the sheets hold posts about mental health: keep them on the machines the study allows."
)
MANIFEST = "sample.json"


def expert_eval(cfg: DictConfig):
    if cfg.action not in ACTIONS:
        raise ConfigError(f"action={cfg.action!r} is not one of {', '.join(ACTIONS)}")
    dims = kit.rubric_dimensions(OmegaConf.to_container(cfg.rubric, resolve=True))
    if cfg.action == "sample":
        return sample(cfg, dims)
    if cfg.action == "rate":
        from mentalglm.expert.rating import serve_rating_page

        return serve_rating_page(cfg, dims)
    return aggregate(cfg, dims)


def prediction_files(cfg: DictConfig) -> dict[str, str]:
    """Model name -> predictions file: `predictions`, else the test answers of the train run `run_dir` names."""
    files = dict(cfg.predictions or {})
    if not files and cfg.get("run_dir"):  # a train.py run: its model's test answers (its data was restored)
        from mentalglm.runtime.builders import resolve_adapter
        from mentalglm.runtime.run_card import read_card

        card = read_card(resolve_adapter(cfg)) or {}
        files = {(card.get("model") or {}).get("name", "model"): Path(str(cfg.run_dir)) / "test" / "predictions.jsonl"}
    if not files:
        raise ConfigError(
            "action=sample needs predictions: run_dir=TRAIN_RUN, or +predictions.MODEL=PATH for each model rated"
        )
    for model, path in files.items():
        if not Path(str(path)).is_file():
            raise ConfigError(f"predictions.{model}={path}: no such file")
    return {model: str(path) for model, path in files.items()}


def sample(cfg: DictConfig, dims: list[kit.Dimension]) -> dict:
    from mentalglm.data.splits import post_of

    tasks = build_tasks(cfg)
    sources = prediction_files(cfg)
    answers = {model: kit.read_answers(Path(path), tasks) for model, path in sources.items()}
    answered = set.intersection(*(set(a) for a in answers.values()))
    partial = len(set.union(*(set(a) for a in answers.values())) - answered)
    if partial:
        log.warning("%d items answered by only some of the models are left out of the sample", partial)
    names = [n for n in selected_tasks(cfg, tasks) if any(k[0] == n for k in answered)]
    if not names:
        raise ConfigError("no task of data.select is answered in every predictions file")
    records = load_splits(cfg, tasks, names).get(cfg.split, [])
    posts = {(r["task"], str(r["id"]), r.get("aspect") or ""): post_of(r) for r in records}
    strays = sorted(k for k in answered if k[0] in names and k not in posts)
    if strays:
        task, item, _ = strays[0]
        raise ConfigError(
            f"{len(strays)} answered items are not in the {cfg.split} split of data={cfg.data.name} "
            f"(first: task {task}, id {item!r}): the predictions are of other data"
        )
    split_sizes = {n: sum(k[0] == n for k in posts) for n in names}
    keys = {n: [k for k in answered if k[0] == n] for n in names}
    if cfg.per_task:
        counts = {n: int(v) for n, v in cfg.per_task.items()}
        unknown = [n for n in counts if n not in keys]
        if unknown:
            raise ConfigError(f"per_task names {unknown}, which no predictions file answers")
    else:
        counts = kit.stratified_counts(split_sizes, int(cfg.size))
    chosen = kit.draw_items(keys, counts, int(cfg.seed))
    models = list(answers)
    items = [
        {
            "task": t,
            "id": i,
            "aspect": a,
            "post": posts[(t, i, a)],
            "answers": {m: answers[m][(t, i, a)] for m in models},
        }
        for t, i, a in chosen
    ]
    empty = [(it["task"], it["id"], m) for it in items for m, text in it["answers"].items() if not text.strip()]
    if empty:
        t, i, m = empty[0]
        raise ConfigError(f"predictions.{m}: task {t} item {i!r} has an empty answer (nothing to rate)")
    key, sheets = kit.blind(items, models, list(cfg.raters), int(cfg.seed))
    out = Path(cfg.output_dir)
    fields = kit.sheet_fields(dims)
    files = {out / "key.csv": csv_text(kit.KEY_FIELDS, key), out / "rubric.md": kit.rubric_markdown(dims, NOTICE)}
    shown = {n: t.display_name for n, t in tasks.items()}  # the sheets are read by people; the key keeps names
    for rater, rows in sheets.items():
        rows = [r | {"task": shown.get(r["task"], r["task"])} for r in rows]
        # A BOM, so spreadsheet programs open the Chinese text as UTF-8.
        files[out / "sheets" / f"{rater}.csv"] = "\ufeff" + csv_text(
            fields, [r | {d.name: "" for d in dims} for r in rows]
        )
    manifest = {
        "models": sources,
        "split": cfg.split,
        "seed": int(cfg.seed),
        "per_task": counts,
        "split_sizes": split_sizes,
        "raters": list(cfg.raters),
        "rubric": OmegaConf.to_container(cfg.rubric, resolve=True),
        "answers": len(key),
    }
    files[out / MANIFEST] = dumps_json(manifest)
    write_files_atomic(files)
    log.info("sampled %s from the %s split: %d answers per rater; sheets in %s", counts, cfg.split, len(key), out)
    log.info("keep %s away from the raters: it unblinds the sheets", out / "key.csv")
    return manifest


def sheet_paths(cfg: DictConfig, run: Path) -> list[Path]:
    if cfg.sheets:
        return [Path(str(p)) for p in cfg.sheets]
    found = sorted((run / "sheets").glob("*.csv"))
    if not found:
        raise ConfigError(f"run_dir={run}: no sheets/*.csv (give sheets=[PATH, ...])")
    return found


def aggregate(cfg: DictConfig, dims: list[kit.Dimension]) -> dict:
    if not cfg.run_dir:
        raise ConfigError("action=aggregate needs run_dir=PATH (the folder action=sample wrote, with key.csv)")
    run = Path(str(cfg.run_dir))
    key = kit.read_key(Path(str(cfg.key)) if cfg.key else run / "key.csv")
    sheets = {}
    for path in sheet_paths(cfg, run):
        if not path.is_file():
            raise ConfigError(f"sheets: {path} is not a file")
        if path.stem in sheets:
            raise ConfigError(f"sheets: two sheets of rater {path.stem!r} ({path.name})")
        sheets[path.stem] = kit.read_sheet(path, key, dims)
    tasks = build_tasks(cfg)
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8")) if (run / MANIFEST).is_file() else {}
    order = [*manifest.get("models", {}), *tasks]  # the sample's model order, the data config's task order
    report = kit.aggregate(key, sheets, dims, list(cfg.overall_of), level=str(cfg.agreement_level), order=order)
    out = Path(cfg.output_dir)
    long_fields = ["rater", *kit.KEY_FIELDS, *(d.name for d in dims)] + ([kit.OVERALL] if cfg.overall_of else [])
    summary = {k: report[k] for k in ("models", "tasks", "agreement", "level")} | {"raters": list(sheets)}
    write_files_atomic(
        {
            out / "results.md": kit.aggregate_markdown(
                report, dims, {n: t.display_name for n, t in tasks.items()}, NOTICE
            ),
            out / "metrics.json": dumps_json(summary),
            out / "ratings.csv": csv_text(long_fields, report["ratings"]),
            out / "box_plots.png": kit.box_plot_png(report, dims),
        }
    )
    for name, a in report["agreement"].items():
        log.info("%s: alpha %s, kappa %s", name, a["alpha"], a["kappa_quadratic"])
    log.info("wrote %s", out / "results.md")
    return json.loads(dumps_json(summary))
