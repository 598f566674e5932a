"""What build_data.py runs: explanation data from a teacher LLM, its expert revision, IMHI translation into
Chinese, and zero/few-shot baselines of API LLMs (paper §2.3, §3.2, §4.2.1, Appendix B, Table 4).

explain    each labelled item of the configured splits gets the paper's prompt (instruction, definitions,
           expert examples, the post and its gold labels); the task's parser reads the label the teacher
           stated. Agreed answers become instruction rows (`<split>.jsonl`, alpaca form, read by
           data.tasks.<name> as they are) in the canonical form: the gold label sentence, the marker, the
           teacher's explanation. Disagreements and unparsed answers go to `revision.csv` (on_disagree=revise),
           are dropped (drop) or kept as written (keep; unparsed ones still go to the sheet).
merge      the experts' filled `revised_answer` column back into an explain run's files (in place, all files
           or none); a revised answer must parse to the gold labels and carry an explanation.
translate  IMHI rows into Chinese: the post and the explanation are translated, the label sentence is rendered
           from the Chinese task (conf/tasks/*_zh.yaml), so labels stay exact.
baseline   the teacher answers a split zero- or k-shot with the label set stated; predictions.jsonl is scored
           by the project's scorer (metrics.json, results.md).

Every answer is appended to the response cache the moment it arrives: a rerun (after a crash, SIGKILL, a quota
stop) sends no request twice and writes the same files byte for byte. Logs hold counts and rates, never posts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mentalglm.config import TeacherConfig, as_config
from mentalglm.data.io import DataError, read_text
from mentalglm.data.splits import SPLITS
from mentalglm.errors import ConfigError, PredictionsError
from mentalglm.fileio.atomic import csv_text, dumps_json, jsonl_text, read_csv, write_files_atomic
from mentalglm.runtime.builders import build_tasks, load_splits, selected_tasks
from mentalglm.scoring.parsing import explanation_part, parse_labels
from mentalglm.tasks import TASKS, Task
from mentalglm.teacher import prompts as P
from mentalglm.teacher.cache import ResponseCache, cache_key, prompt_hash
from mentalglm.teacher.client import Reply, TeacherClient, sampling_settings

log = logging.getLogger(__name__)

ACTIONS = ("explain", "merge", "translate", "baseline")
ON_DISAGREE = ("revise", "drop", "keep")
SHEET_FIELDS = (
    "split",
    "task",
    "id",
    "aspect",
    "gold",
    "status",
    "problem",
    "post",
    "teacher_answer",
    "revised_answer",
)
PENDING = "pending.jsonl"
REPORT = "build_report.json"
SCREENING = (
    "Explanations written by an LLM teacher are training data for research models, not clinical judgements; "
    "have experts review them before use."
)


def build_data(cfg: DictConfig) -> dict:
    action = cfg.action
    if action not in ACTIONS:
        raise ConfigError(f"action={action!r} is unknown; choose one of {', '.join(ACTIONS)}")
    if cfg.on_disagree not in ON_DISAGREE:
        raise ConfigError(f"on_disagree={cfg.on_disagree!r}: choose one of {', '.join(ON_DISAGREE)}")
    bad = [s for s in cfg.splits if s not in SPLITS]
    if bad:
        raise ConfigError(f"splits: {bad} are not splits; choose from {', '.join(SPLITS)}")
    if action == "merge":
        return merge(cfg)
    return {"explain": explain, "translate": translate, "baseline": baseline}[action](cfg)


# ----------------------------------------------------------------------------- shared
@dataclass
class Job:
    """One request: the item it belongs to, its messages and its cache key."""

    item: str
    messages: list[dict]
    key: str
    prompt_sha: str


def make_job(kind: str, item: str, messages: list[dict], model: str, settings: dict) -> Job:
    sha = prompt_hash(messages)
    return Job(item, messages, cache_key(kind, item, sha, model, settings), sha)


def teacher_config(cfg: DictConfig) -> TeacherConfig:
    return as_config(TeacherConfig, cfg.teacher)


def language_prompts(cfg: DictConfig, language: str) -> dict:
    prompts = OmegaConf.to_container(cfg.prompts, resolve=True) or {}
    chosen = prompts.get(language)
    needed = ("explain", "example", "translate", "baseline", "shot")
    if not isinstance(chosen, dict) or any(k not in chosen for k in needed):
        missing = [k for k in needed if not isinstance(chosen, dict) or k not in chosen]
        raise ConfigError(f"prompts.{language}: missing templates {missing}")
    return chosen


def ask_all(client_cfg: TeacherConfig, cache: ResponseCache, jobs: list[Job], desc: str, check) -> dict:
    """Send every job whose answer is not cached; returns the counts (asked, cached, failed, usage).
    `check(job, reply)` names a problem that makes a retry worthwhile (an empty answer), or None."""
    todo = [j for j in jobs if cache.get(j.key) is None]
    cached = len(jobs) - len(todo)
    if cached:
        log.info("%s: %d of %d answers come from the cache, asking for %d", desc, cached, len(jobs), len(todo))
    from mentalglm.teacher.client import Usage

    stats = {"asked": 0, "cached": cached, "usage": Usage().as_dict(client_cfg), "failed": Counter()}
    if todo:
        asyncio.run(_ask(client_cfg, cache, todo, desc, check, stats))
    return stats


async def _ask(client_cfg: TeacherConfig, cache: ResponseCache, todo: list[Job], desc: str, check, stats) -> None:
    from tqdm import tqdm

    client = TeacherClient(client_cfg)
    bar = tqdm(total=len(todo), desc=desc, unit="item")

    async def one(job: Job) -> None:
        for attempt in range(client_cfg.max_retries + 1):
            reply: Reply = await client.chat(job.messages)
            problem = check(job, reply)
            if problem is None:
                break
            client.usage.retries[problem] += 1
            if attempt < client_cfg.max_retries:
                await asyncio.sleep(client._delay(attempt))
        else:
            stats["failed"][problem] += 1  # not cached: a rerun asks again
            bar.update(1)
            return
        cache.put(
            {
                "key": job.key,
                "item": job.item,
                "prompt_sha256": job.prompt_sha,
                "model": client_cfg.model,
                "settings": client.settings(),
                "content": reply.content,
                "finish_reason": reply.finish_reason,
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
                "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
            }
        )
        stats["asked"] += 1
        bar.update(1)

    tasks = [asyncio.ensure_future(one(job)) for job in todo]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        if failed:  # a wrong key or an exhausted quota: stop the rest (their answers so far are cached)
            raise failed[0]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        stats["usage"] = client.usage.as_dict(client_cfg)
        await client.close()


def empty_answer(job: Job, reply: Reply) -> str | None:
    return "empty answer" if not reply.content.strip() else None


def out_folder(cfg: DictConfig) -> Path:
    return Path(cfg.output) if cfg.get("output") else Path(cfg.output_dir)


def rate(n: int, total: int) -> float | None:
    return round(n / total, 4) if total else None


# ----------------------------------------------------------------------------- explain
def judge(task: Task, gold: list[str], entry: dict) -> tuple[str, str | None]:
    """(status, problem): agreed / disagreed / unparsed, as the task's own parser reads the teacher's label; a
    truncated, explanation-less or wrong-language answer is not in the canonical form (unparsed, with why)."""
    content = entry["content"]
    parsed = parse_labels(task, content)
    if entry.get("finish_reason") == "length":
        return "unparsed", "truncated at teacher.max_tokens"
    if not parsed.parsed:
        return "unparsed", "no label found"
    if parsed.labels != task.order_labels(gold):
        return "disagreed", None
    explanation = explanation_part(task, content)
    if not explanation:
        return "unparsed", f"no explanation after {task.explanation_marker.strip()!r}"
    if problem := P.language_problem(explanation, task.language):
        return "unparsed", f"explanation not in {task.language}: {problem}"
    return "agreed", None


def explain_tasks(cfg: DictConfig, tasks: dict[str, Task]) -> list[str]:
    """data.select, else the tasks with a teacher instruction (instructions.<task>): C-IMHI's, not IMHI's."""
    names = selected_tasks(cfg, tasks)
    if cfg.data.get("select") is not None:
        return names
    chosen = [n for n in names if (cfg.instructions or {}).get(n)]
    if not chosen:
        raise ConfigError(
            f"no task of data={cfg.data.name} has a teacher instruction: set instructions.<task>=PATH "
            "(conf/instructions/ holds the C-IMHI tasks') or data.select=[...]"
        )
    if left := [n for n in names if n not in chosen]:
        log.info("explaining %s (the tasks with an instruction); not %s", ", ".join(chosen), ", ".join(left))
    return chosen


def train_command(out: Path) -> str:
    return f"python train.py data=c_imhi data.dirs.c_imhi={out}"


def explain(cfg: DictConfig) -> dict:
    tasks = build_tasks(cfg)
    names = explain_tasks(cfg, tasks)
    teacher = teacher_config(cfg)
    splits = load_splits(cfg, tasks, names)
    settings = sampling_settings(teacher)
    per_task = {}
    for name in names:
        task = tasks[name]
        instruction = P.read_instruction(task, (cfg.instructions or {}).get(name))
        examples = P.read_examples(task, (cfg.examples or {}).get(name))
        chosen, coverage = P.choose_examples(task, examples, cfg.examples_per_label)
        if not chosen:
            log.warning("task %s: no expert examples (expert_examples=... or examples.%s=PATH)", name, name)
        short = [u for u, n in coverage.items() if n < (cfg.examples_per_label or 1)]
        if chosen and short:
            log.warning("task %s: expert examples show %d labels fewer times than asked: %s", name, len(short), short)
        per_task[name] = {"instruction": instruction, "examples": chosen, "coverage": coverage}
    prompts = {lang: language_prompts(cfg, lang) for lang in {tasks[n].language for n in names}}
    jobs, items = [], []
    for split in cfg.splits:
        for record in splits[split]:
            if record["task"] not in per_task:
                continue
            task, spec = tasks[record["task"]], per_task[record["task"]]
            messages = P.explain_messages(
                task,
                record,
                instruction=spec["instruction"],
                examples=spec["examples"],
                prompts=prompts[task.language],
                system=teacher.system,
            )
            item = f"{split}/{task.name}/{record['id']}/{record.get('aspect') or ''}"
            jobs.append(make_job("explain", item, messages, teacher.model, settings))
            items.append((split, record))
    if not jobs:
        raise ConfigError(f"no items to explain in splits {list(cfg.splits)} of tasks {', '.join(names)}")
    cache = ResponseCache(cfg.cache)
    started = time.monotonic()
    stats = ask_all(teacher, cache, jobs, "explain", empty_answer)

    out = out_folder(cfg)
    rows: dict[str, list[dict]] = {s: [] for s in cfg.splits}
    pending, sheet = [], []
    counts: dict[str, Counter] = defaultdict(Counter)
    for job, (split, record) in zip(jobs, items):
        task = tasks[record["task"]]
        entry = cache.get(job.key)
        c = counts[f"{task.name}/{split}"]
        c["items"] += 1
        if entry is None:
            status, problem = "unparsed", "no answer (empty after retries)"
        else:
            status, problem = judge(task, record["labels"], entry)
        c[status] += 1
        if problem:
            c[f"problem: {problem}"] += 1
        if status == "agreed":
            answer = task.format_answer(record["labels"], explanation_part(task, entry["content"]))
            rows[split].append(P.instruction_row(task, record, answer, entry, False, teacher.model))
            continue
        if cfg.on_disagree == "keep" and status == "disagreed":
            rows[split].append(
                P.instruction_row(task, record, entry["content"].strip(), entry, False, teacher.model, agrees=False)
            )
            c["kept"] += 1
            continue
        if cfg.on_disagree == "drop":
            c["dropped"] += 1
            continue
        c["to_revise"] += 1
        pending.append(
            {
                "split": split,
                "task": task.name,
                "id": record["id"],
                "aspect": record.get("aspect") or "",
                "query": record["query"],
                "labels": task.order_labels(record["labels"]),
                "status": status,
                "problem": problem or "",
                "teacher_model": teacher.model,
                "prompt_sha256": job.prompt_sha,
                "date": (entry or {}).get("date"),
            }
        )
        sheet.append(
            {
                "split": split,
                "task": task.name,
                "id": record["id"],
                "aspect": record.get("aspect") or "",
                "gold": P.label_list(task, record["labels"]),
                "status": status,
                "problem": problem or "",
                "post": P.raw_post(record),
                "teacher_answer": (entry or {}).get("content", ""),
                "revised_answer": "",
            }
        )
    report = {
        "action": "explain",
        "teacher": {"base_url": teacher.base_url, "model": teacher.model, **sampling_settings(teacher)},
        "on_disagree": cfg.on_disagree,
        "splits": list(cfg.splits),
        "files": {s: f"{s}.jsonl" for s in cfg.splits},
        "tasks": {k: explain_rates(v) for k, v in counts.items()},
        "examples": {n: {"count": len(s["examples"]), "per_label": s["coverage"]} for n, s in per_task.items()},
        "requests": {"asked": stats["asked"], "cached": stats["cached"], "failed": dict(stats["failed"])},
        "usage": stats["usage"],
        "seconds": round(time.monotonic() - started, 1),
        "notice": SCREENING,
        "train_command": train_command(out),
    }
    files = {out / f"{s}.jsonl": jsonl_text(rows[s]) for s in cfg.splits}
    files[out / PENDING] = jsonl_text(pending)
    files[out / REPORT] = dumps_json(report)
    files[out / "build_report.md"] = explain_markdown(report)
    if sheet:
        files[out / "revision.csv"] = csv_text(SHEET_FIELDS, sheet)
    else:
        (out / "revision.csv").unlink(missing_ok=True)
    write_files_atomic(files)
    for key, value in report["tasks"].items():
        log.info(
            "%s: %d items, agreed %s, disagreed %s, unparsed %s",
            key,
            value["items"],
            value["agreed_rate"],
            value["disagreed_rate"],
            value["unparsed_rate"],
        )
    if sheet:
        log.info(
            "%d answers to revise: fill revised_answer in %s, then build_data.py action=merge run_dir=%s",
            len(sheet),
            out / "revision.csv",
            out,
        )
    log.info("wrote %s", ", ".join(str(out / f"{s}.jsonl") for s in cfg.splits))
    log.info("train stage two on it%s: %s", " (after the merge)" if sheet else "", train_command(out))
    return report


def explain_rates(c: Counter) -> dict:
    n = c["items"]
    out = {"items": n}
    for status in ("agreed", "disagreed", "unparsed"):
        out[status] = c[status]
        out[f"{status}_rate"] = rate(c[status], n)
    for k in ("to_revise", "dropped", "kept"):
        if c[k]:
            out[k] = c[k]
    problems = {k.split(": ", 1)[1]: v for k, v in c.items() if k.startswith("problem: ")}
    if problems:
        out["problems"] = dict(sorted(problems.items()))
    return out


def explain_markdown(report: dict) -> str:
    lines = [
        f"# Explanation data: teacher {report['teacher']['model']}",
        "",
        f"> {SCREENING}",
        "",
        "| task/split | items | agreed | disagreed | unparsed | to revise | dropped | kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, v in report["tasks"].items():
        pct = lambda r: "-" if r is None else f"{100 * r:.1f}%"  # noqa: E731
        lines.append(
            f"| {key} | {v['items']} | {pct(v['agreed_rate'])} | {pct(v['disagreed_rate'])} | "
            f"{pct(v['unparsed_rate'])} | {v.get('to_revise', 0)} | {v.get('dropped', 0)} | {v.get('kept', 0)} |"
        )
    u = report["usage"] or {}
    lines += [
        "",
        f"Requests: {report['requests']['asked']} asked, {report['requests']['cached']} from the cache; "
        f"retries {u.get('retries', {})}; tokens {u.get('prompt_tokens', 0)} in / {u.get('completion_tokens', 0)} "
        f"out; estimated cost {u.get('estimated_cost', 0)} {u.get('currency', '')}.",
        "",
    ]
    if report.get("train_command"):
        lines += ["Train stage two on these files:", "", f"    {report['train_command']}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- merge
def merge(cfg: DictConfig) -> dict:
    from mentalglm.fileio.atomic import read_partial

    if not cfg.get("run_dir"):
        raise ConfigError("action=merge needs run_dir=PATH (the folder an explain run wrote its files to)")
    run = Path(cfg.run_dir)
    report_file = run / REPORT
    if not report_file.is_file():
        raise ConfigError(f"run_dir={run}: no {REPORT} (not the output of build_data.py action=explain)")
    import json

    report = json.loads(report_file.read_text(encoding="utf-8"))
    sheet_path = Path(cfg.sheet) if cfg.get("sheet") else run / "revision.csv"
    if not sheet_path.is_file():
        raise ConfigError(f"sheet={sheet_path} is not a file")
    tasks = {**TASKS, **build_tasks(cfg)}
    pending = {(p["split"], p["task"], p["id"], p["aspect"]): p for p in read_partial(run / PENDING)}
    try:
        text = read_text(sheet_path, newlines=False)
    except DataError as e:
        raise PredictionsError(str(e)) from None
    fieldnames, sheet_rows = read_csv(text)
    missing = [f for f in ("split", "task", "id", "aspect", "revised_answer") if f not in fieldnames]
    if missing:
        raise PredictionsError(f"{sheet_path}:1: missing columns {missing} (the sheet build_data.py wrote has them)")
    merged: dict[str, list[dict]] = defaultdict(list)
    earlier = merged_before(run, report)
    done, left, again, seen = [], 0, 0, {}
    # Rows are named as a spreadsheet shows them (the header is row 1), not by file line: a cell may span lines.
    for row_no, row in enumerate(sheet_rows, start=2):
        where = f"{sheet_path}: row {row_no}"
        key = (row["split"], row["task"], row["id"], row["aspect"] or "")
        if key in seen:
            raise PredictionsError(f"{where}: field 'id': {row['id']!r} of task {row['task']} repeats row {seen[key]}")
        seen[key] = row_no
        answer = (row.get("revised_answer") or "").strip()
        item = pending.get(key)
        if item is None and key in earlier:
            task = tasks[row["task"]]
            if (
                answer
                and task.format_answer(task.order_labels(earlier[key]["labels"]), explanation_part(task, answer))
                != earlier[key]["output"]
            ):
                raise PredictionsError(
                    f"{where}: field 'revised_answer': {row['id']!r} of task {row['task']} ({row['split']}) was merged "
                    "before with another answer; a merged row cannot change (edit the training file itself)"
                )
            again += 1  # merged in an earlier round, unchanged (or emptied): skipped
            continue
        if item is None:
            raise PredictionsError(
                f"{where}: field 'id': {row['id']!r} of task {row['task']} ({row['split']}) is not an item waiting "
                f"for revision in {run / PENDING} (an edited id?)"
            )
        if not answer:
            left += 1
            continue
        task = tasks[item["task"]]
        parsed = parse_labels(task, answer)
        if not parsed.parsed or parsed.labels != item["labels"]:
            stated = parsed.labels if parsed.parsed else "no label"
            raise PredictionsError(
                f"{where}: field 'revised_answer': states {stated}, but the gold labels are {item['labels']}; "
                "a revised answer keeps the gold labels"
            )
        if not explanation_part(task, answer):
            raise PredictionsError(
                f"{where}: field 'revised_answer': no explanation after {task.explanation_marker.strip()!r}"
            )
        canonical = task.format_answer(item["labels"], explanation_part(task, answer))
        record = {"id": item["id"], "query": item["query"], "labels": item["labels"], "aspect": item["aspect"]}
        entry = {"model": item["teacher_model"], "prompt_sha256": item["prompt_sha256"], "date": item["date"]}
        merged[item["split"]].append(P.instruction_row(task, record, canonical, entry, True, item["teacher_model"]))
        done.append(key)
    if not done and again:
        log.info("nothing new to merge: %d rows of %s were merged before (%d left empty)", again, sheet_path, left)
        return {"merged": 0, "already_merged": again, "left": left}
    if not done:
        raise PredictionsError(f"{sheet_path}: no filled revised_answer cells ({left} rows left empty)")
    files = {}
    for split, new in merged.items():
        path = run / report["files"][split]
        rows = list(read_partial(path)) + new
        files[path] = jsonl_text(rows)
    rest = [p for k, p in pending.items() if k not in set(done)]
    files[run / PENDING] = jsonl_text(rest)
    report.setdefault("revisions", []).append(
        {"sheet": str(sheet_path), "merged": len(done), "already_merged": again, "left": left}
    )
    files[run / REPORT] = dumps_json(report)
    write_files_atomic(files)
    log.info(
        "merged %d revised answers into %s (%d merged before and skipped, %d rows of the sheet left empty)",
        len(done),
        run,
        again,
        left,
    )
    return {"merged": len(done), "already_merged": again, "left": left}


def merged_before(run: Path, report: dict) -> dict[tuple, dict]:
    """The rows an earlier merge wrote (provenance.revised), by (split, task, id, aspect)."""
    from mentalglm.fileio.atomic import read_partial

    out = {}
    for split, name in report["files"].items():
        for row in read_partial(run / name):
            if (row.get("provenance") or {}).get("revised"):
                out[(split, row["task"], str(row["id"]), row.get("aspect") or "")] = row
    return out


# ----------------------------------------------------------------------------- translate
def translate(cfg: DictConfig) -> dict:
    tasks = build_tasks(cfg)
    names = selected_tasks(cfg, tasks)
    teacher = teacher_config(cfg)
    mapping = dict(cfg.translate or {})
    targets = {}
    for name in names:
        if name not in mapping:
            raise ConfigError(f"translate.{name}: no Chinese task is named for task {name} (translate.{name}=TASK)")
        source, target = tasks[name], TASKS.get(mapping[name]) or tasks.get(mapping[name])
        if target is None:
            raise ConfigError(f"translate.{name}={mapping[name]}: no such task (conf/tasks/{mapping[name]}.yaml)")
        if target.labels != source.labels or target.aspects != source.aspects:
            raise ConfigError(f"translate.{name}={target.name}: its labels or aspects differ from {name}'s")
        targets[name] = target
    splits = load_splits(cfg, tasks, names)
    settings = sampling_settings(teacher)
    prompts = language_prompts(cfg, "zh")
    jobs, parts = [], []  # parts: (split, record, field)
    for split in cfg.splits:
        for record in splits[split]:
            source = tasks[record["task"]]
            texts = {"post": P.raw_post(record), "explanation": explanation_part(source, record["answer"])}
            for part, text in texts.items():
                if not text.strip():
                    continue
                messages = P.translate_messages(text, prompts, teacher.system)
                item = f"{split}/{source.name}/{record['id']}/{record.get('aspect') or ''}/{part}"
                jobs.append(make_job("translate", item, messages, teacher.model, settings))
                parts.append((split, record, part))
    if not jobs:
        raise ConfigError(f"nothing to translate in splits {list(cfg.splits)} of tasks {', '.join(names)}")
    cache = ResponseCache(cfg.cache)

    def check(job: Job, reply: Reply) -> str | None:
        if not reply.content.strip():
            return "empty answer"
        if problem := P.language_problem(reply.content, "zh"):
            return f"not Chinese ({problem})"
        return None

    started = time.monotonic()
    stats = ask_all(teacher, cache, jobs, "translate", check)
    done: dict[tuple, dict] = defaultdict(dict)
    for job, (split, record, part) in zip(jobs, parts):
        entry = cache.get(job.key)
        done[(split, record["task"], record["id"], record.get("aspect") or "")][part] = entry
    rows: dict[str, list[dict]] = {s: [] for s in cfg.splits}
    counts: dict[str, Counter] = defaultdict(Counter)
    untranslated = []
    for split in cfg.splits:
        for record in splits[split]:
            key = (split, record["task"], record["id"], record.get("aspect") or "")
            if key not in done:
                continue
            c = counts[f"{targets[record['task']].name}/{split}"]
            c["items"] += 1
            entries = done[key]
            reason = next((p for p, e in entries.items() if e is None), None)
            truncated = next((p for p, e in entries.items() if e and e.get("finish_reason") == "length"), None)
            if reason or truncated:
                c["untranslated"] += 1
                why = f"{reason or truncated}: " + ("no answer" if reason else "truncated at teacher.max_tokens")
                untranslated.append({"split": split, "task": record["task"], "id": record["id"], "reason": why})
                continue
            target = targets[record["task"]]
            query, _, _ = target.format_query(entries["post"]["content"].strip(), record.get("aspect") or "")
            explanation = entries["explanation"]["content"].strip() if "explanation" in entries else None
            answer = target.format_answer(record["labels"], explanation)
            translated = {**record, "query": query}
            row = P.instruction_row(target, translated, answer, entries["post"], False, teacher.model)
            row["provenance"]["source_task"] = record["task"]
            row["provenance"]["translated"] = True
            rows[split].append(row)
            c["translated"] += 1
    out = out_folder(cfg)
    report = {
        "action": "translate",
        "teacher": {"base_url": teacher.base_url, "model": teacher.model, **sampling_settings(teacher)},
        "files": {s: f"{s}.jsonl" for s in cfg.splits},
        "tasks": {k: {**dict(v), "translated_rate": rate(v["translated"], v["items"])} for k, v in counts.items()},
        "requests": {"asked": stats["asked"], "cached": stats["cached"], "failed": dict(stats["failed"])},
        "usage": stats["usage"],
        "seconds": round(time.monotonic() - started, 1),
    }
    files = {out / f"{s}.jsonl": jsonl_text(rows[s]) for s in cfg.splits}
    files[out / REPORT] = dumps_json(report)
    if untranslated:
        files[out / "untranslated.csv"] = csv_text(("split", "task", "id", "reason"), untranslated)
    write_files_atomic(files)
    for key, value in report["tasks"].items():
        log.info("%s: %d items, %d translated", key, value["items"], value.get("translated", 0))
    if untranslated:
        log.warning(
            "%d items not translated (listed in %s): rerun to ask again", len(untranslated), out / "untranslated.csv"
        )
    return report


# ----------------------------------------------------------------------------- baseline
def baseline(cfg: DictConfig) -> dict:
    import random

    from mentalglm.reporting.writer import score_predictions_file

    tasks = build_tasks(cfg)
    names = selected_tasks(cfg, tasks)
    teacher = teacher_config(cfg)
    splits = load_splits(cfg, tasks, names)
    records = [r for r in splits[cfg.split] if r["task"] in names]
    if not records:
        raise ConfigError(f"no {cfg.split} items in tasks {', '.join(names)} (data.tasks.<task>.{cfg.split})")
    if cfg.data.limit_eval:
        per: Counter = Counter()
        kept = []
        for r in records:
            per[r["task"]] += 1
            if per[r["task"]] <= cfg.data.limit_eval:
                kept.append(r)
        records = kept
    pool: dict[str, list[dict]] = defaultdict(list)
    for r in splits["train"]:
        pool[r["task"]].append(r)
    rng = random.Random(cfg.seed)
    prompts = {lang: language_prompts(cfg, lang) for lang in {tasks[n].language for n in names}}
    settings = {**sampling_settings(teacher), "shots": cfg.shots}
    jobs = []
    for record in records:
        task = tasks[record["task"]]
        candidates = [x for x in pool[task.name] if x["id"] != record["id"]]
        if len(candidates) < cfg.shots:
            raise ConfigError(f"shots={cfg.shots} but task {task.name} has {len(candidates)} training examples")
        shots = rng.sample(candidates, cfg.shots) if cfg.shots else []
        messages = P.baseline_messages(task, record, shots, prompts[task.language], teacher.system)
        item = f"{cfg.split}/{task.name}/{record['id']}/{record.get('aspect') or ''}"
        jobs.append(make_job("baseline", item, messages, teacher.model, settings))
    cache = ResponseCache(cfg.cache)
    stats = ask_all(teacher, cache, jobs, f"baseline {cfg.shots}-shot", lambda job, reply: None)
    rows = []
    for job, record in zip(jobs, records):
        entry = cache.get(job.key)
        rows.append(
            {
                "task": record["task"],
                "id": record["id"],
                "aspect": record.get("aspect") or "",
                "labels": record["labels"],
                "output": entry["content"] if entry else "",
                "truncated": bool(entry and entry.get("finish_reason") == "length"),
                "parser": "free",  # an API model answers in its own words; rescoring the file reads it the same way
            }
        )
    out = Path(cfg.output_dir)
    predictions = out / "predictions.jsonl"
    write_files_atomic({predictions: jsonl_text(rows)})
    used = {n: tasks[n] for n in names}
    result = score_predictions_file(
        predictions,
        out,
        used,
        templates=OmegaConf.to_container(cfg.data.templates, resolve=True),
        title=f"Results: {teacher.model} {cfg.shots}-shot ({cfg.split})",
    )
    report = {
        "action": "baseline",
        "teacher": {"base_url": teacher.base_url, "model": teacher.model, **sampling_settings(teacher)},
        "split": cfg.split,
        "requests": {"asked": stats["asked"], "cached": stats["cached"]},
        "usage": stats["usage"],
    }
    write_files_atomic({out / REPORT: dumps_json(report)})
    log.info("%s %d-shot on %s: scored %d answers into %s", teacher.model, cfg.shots, cfg.split, len(rows), out)
    return result
