"""What kind of answers a training split holds: the paper's model learns the label *and* an explanation.

`data.answers` says what a data config means to train (explained | label_only); a stage whose training answers
carry no explanation while `explained` is asked stops with the two ways forward, so a label-only model is never
trained by accident.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from mentalglm.errors import ConfigError
from mentalglm.tasks import Task

ANSWERS = ("explained", "label_only")
BUILD_COMMAND = "python build_data.py data=label_only output=DIR (teacher=... as the README's C-IMHI section says)"


def has_explanation(task: Task, answer: str) -> bool:
    """The answer holds text after the task's explanation marker (the canonical `label sentence, marker, why`)."""
    marker = task.explanation_marker.strip()
    return bool(marker) and marker in answer and bool(answer.split(marker, 1)[1].strip())


def explained_counts(records: Iterable[Mapping], tasks: Mapping[str, Task]) -> dict[str, tuple[int, int]]:
    """task -> (answers, answers with an explanation) of a split's records."""
    total, explained = Counter(), Counter()
    for r in records:
        total[r["task"]] += 1
        explained[r["task"]] += has_explanation(tasks[r["task"]], r["answer"])
    return {t: (n, explained[t]) for t, n in total.items()}


def label_only_error(data_name: str, tasks: list[str], why: str) -> ConfigError:
    return ConfigError(
        f"data={data_name} asks for explained answers (data.answers=explained) but {why} for {', '.join(tasks)}: "
        f"build explanation-bearing C-IMHI with `{BUILD_COMMAND}` and train with `data=c_imhi data.dirs.c_imhi=DIR`, "
        "or train label-only answers on purpose with `data=label_only`"
    )


def check_explained(data_name: str, answers: str, counts: Mapping[str, tuple[int, int]]) -> list[str]:
    """Raise when `explained` is asked and a task's training answers carry no explanation; returns the tasks
    where only some do (the caller warns)."""
    if answers != "explained":
        return []
    none = [t for t, (n, k) in counts.items() if n and not k]
    if none:
        raise label_only_error(data_name, none, "the training answers carry no explanation")
    return [t for t, (n, k) in counts.items() if k < n]
