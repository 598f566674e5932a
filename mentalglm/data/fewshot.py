"""k-shot prompts for the zero/few-shot baselines (the paper's "generalized LLM" rows), and the task description
d of the paper's Eq. 1 before a query (`data.task_description`)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping

from mentalglm.errors import ConfigError
from mentalglm.tasks import Task

SHOT_HEADER = {"zh": "示例{i}：\n{query}\n{answer}\n\n", "en": "Example {i}:\n{query}\n{answer}\n\n"}


def describe(task: Task, query: str, start: int, end: int) -> tuple[str, int, int]:
    """`query` with the task's description (labels and what they mean) before it, and the post span shifted."""
    prefix = task.description_text() + "\n\n"
    shift = len(prefix)
    return prefix + query, start + shift if start >= 0 else -1, end + shift if end >= 0 else -1


def add_descriptions(records: list[dict], tasks: Mapping[str, Task]) -> list[dict]:
    out = []
    for r in records:
        query, start, end = describe(tasks[r["task"]], r["query"], r["post_start"], r["post_end"])
        out.append({**r, "query": query, "post_start": start, "post_end": end})
    return out


def add_shots(records: list[dict], pool: list[dict], k: int, *, seed: int, tasks: Mapping[str, Task]) -> list[dict]:
    """Prefix each record's query with k solved examples of the same task drawn from `pool` (the train split).

    The post span is shifted, so truncation still cuts only the target post. The same seed draws the same
    examples; an item is never its own example.
    """
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in pool:
        by_task[r["task"]].append(r)
    rng = random.Random(seed)
    out = []
    for r in records:
        candidates = [x for x in by_task[r["task"]] if x["id"] != r["id"]]
        if len(candidates) < k:
            raise ConfigError(f"shots={k} but task {r['task']} has only {len(candidates)} training examples")
        header = SHOT_HEADER[tasks[r["task"]].language]
        prefix = "".join(
            header.format(i=i + 1, query=x["query"], answer=x["answer"])
            for i, x in enumerate(rng.sample(candidates, k))
        )
        shift = len(prefix)
        span = (r["post_start"] + shift, r["post_end"] + shift) if r["post_start"] >= 0 else (-1, -1)
        out.append({**r, "query": prefix + r["query"], "post_start": span[0], "post_end": span[1]})
    return out
