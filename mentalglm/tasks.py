"""Tasks are data: one YAML file per task (conf/tasks/<name>.yaml), read into the typed `Task` everything else uses.

A task file holds the task's name, display name, kind, labels (with display names), query/answer templates,
explanation marker, parser aliases, positive class, parents, aspects and raw format. The built-in tasks are
read from conf/tasks the same way a user's task is read from any path (`data.tasks.<name>.definition`).

Record schema shared by every loader (one row of a `datasets.Dataset`):
    task      task name
    id        stable item id, unique within (task, split)
    query     the full instruction text (post embedded)
    answer    the gold answer: label sentence, then the explanation marker and explanation if any
    labels    gold labels, list of label names of the task (hierarchical: leaves "父类-子类" or a lone parent)
    aspect    the aspect an aspect task asks about ("" for other tasks)
    post_start, post_end   char span of the post inside `query` (-1, -1 when unknown); truncation
                           cuts only inside this span
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from mentalglm.errors import ConfigError

Kind = Literal["binary", "multiclass", "multilabel", "hierarchical"]
KINDS = ("binary", "multiclass", "multilabel", "hierarchical")
SINGLE_LABEL_KINDS = ("binary", "multiclass")
LANGUAGES = ("zh", "en")
SECONDARY_METRICS = ("accuracy", "f1_weighted")
RECORD_FIELDS = ("task", "id", "query", "answer", "labels", "aspect", "post_start", "post_end")
TASK_DIR = Path(__file__).resolve().parents[1] / "conf" / "tasks"
# Template fields a data config may override per task (data.templates.<task>.<field>).
# Keys of metrics.json beside the metric keys (mentalglm/reporting/writer.py): no task's metric key may be one.
RESERVED_NAMES = frozenset(
    {"f1_mean", "majority_baseline", "tasks", "templates", "scores", "fallback", "explanations", "schema_version"}
)
TEMPLATE_FIELDS = (
    "query_template",
    "answer_template",
    "label_sentences",
    "label_joiner",
    "none_word",
    "explanation_marker",
    "explanation_sep",
    "description",
)


# The parser's vocabulary per language; a task file may replace any list (mentalglm/scoring/parsing.py).
#   explanation_markers  words that open an explanation besides the task's own marker (推理过程： / **解释**： /
#                        ### Explanation): the label part ends at the first
#   negations            a label right after one (a few characters or words later, same clause) is not predicted
#   conclusion_markers   parser.mode=free: the text after the last one is read first (**结论**：低自杀风险)
#   parser_idioms        phrases that are neither a label nor a negation (毫无疑问, "no doubt", "not sure")
#   contrasts            end a negation's scope: `不是低自杀风险，而是高自杀风险`, "not stress but depression"
#   choice_markers       after a list of lettered or numbered options, the words that state the choice
#                        (正确答案：C, "Correct answer: C)"): the letter reads as its option's label
PARSER_DEFAULTS: dict[str, dict[str, tuple[str, ...]]] = {
    "zh": {
        "explanation_markers": ("推理过程", "推理", "解释", "理由", "原因", "分析", "依据", "说明"),
        "negations": (
            "不",
            "没有",
            "没",
            "并非",
            "未",
            "无",
            "毫无",
            "难以看出",
            "看不出",
            "算不上",
            "谈不上",
            "称不上",
            "排除",
            "缺乏",
            "缺少",
            "难以",
            "难说",
            "远非",
            "绝非",
            "无从",
        ),
        "contrasts": ("而是", "但是", "但", "却", "只是", "反而"),
        "conclusion_markers": ("结论", "综上所述", "综上", "总之", "总结", "最终答案", "最终判断", "判断结果", "答案"),
        "parser_idioms": (
            "毫无疑问",
            "无疑",
            "无论",
            "无法",
            "非常",
            "不仅",
            "不只",
            "不管",
            "不论",
            "不断",
            "不停",
            "不得不",
            "不可否认",
            "不难看出",
            "不容忽视",
            "不言而喻",
        ),
        "choice_markers": ("正确答案", "最终答案", "答案", "应选", "选择", "我选", "选"),
    },
    "en": {
        "explanation_markers": ("reasoning", "explanation", "rationale", "analysis", "justification"),
        "negations": (
            "not",
            "no",
            "never",
            "without",
            "nor",
            "neither",
            "cannot",
            "isn't",
            "doesn't",
            "don't",
            "didn't",
            "wasn't",
            "aren't",
            "can't",
            "won't",
            "hardly",
            "far from",
            "rather than",
            "instead of",
            "lack of",
            "lacks",
            "lacking",
            "absence of",
            "free of",
            "unlikely",
        ),
        "contrasts": ("but", "rather", "instead", "however", "yet"),
        "conclusion_markers": ("in conclusion", "conclusion", "final answer", "answer", "verdict", "overall"),
        "parser_idioms": (
            "no doubt",
            "not only",
            "no matter",
            "not entirely clear",
            "not clear",
            "not sure",
            "not certain",
            "without a doubt",
            "cannot be ruled out",
            "can't be ruled out",
            "not be ruled out",
        ),
        "choice_markers": (
            "correct answer",
            "correct option",
            "final answer",
            "the answer is",
            "answer",
            "i choose",
            "i pick",
            "i select",
            "i would choose",
            "option",
        ),
    },
}
PARSER_FIELDS = tuple(PARSER_DEFAULTS["zh"])


@dataclass
class TaskSpec:
    """The schema of a task file. Read through OmegaConf's structured config: a misspelt key or a value of the
    wrong type is an error naming the file, never silently ignored."""

    name: str = "???"
    kind: str = "???"
    query_template: str = "???"
    display_name: str | None = None
    language: str = "zh"
    # A format name (mentalglm/data/formats.py) or an inline table layout
    # ({delimiter, header, columns, id, text, labels}).
    format: Any = None
    labels: list[str] = field(default_factory=list)
    label_display_names: dict[str, str] = field(default_factory=dict)
    parents: dict[str, list[str]] = field(default_factory=dict)
    child_sep: str = "-"
    positive: str | None = None
    aspects: list[str] = field(default_factory=list)
    answer_template: str = ""
    label_sentences: dict[str, str] = field(default_factory=dict)
    label_joiner: str = "、"
    none_word: str = "无"
    explanation_marker: str = "推理："
    explanation_sep: str = ""
    aliases: dict[str, list[str]] = field(default_factory=dict)
    case_sensitive: bool = True
    secondary_metrics: list[str] = field(default_factory=list)
    # The task description d of the paper's Eq. 1 (label set and short definitions), for prompts that state it.
    description: str = ""
    # null = the language's list (PARSER_DEFAULTS)
    explanation_markers: list[str] | None = None
    negations: list[str] | None = None
    conclusion_markers: list[str] | None = None
    parser_idioms: list[str] | None = None
    contrasts: list[str] | None = None
    choice_markers: list[str] | None = None


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    labels: tuple[str, ...]
    # Query with a `{post}` slot (and `{aspect}` for aspect tasks).
    query_template: str
    display_name: str = ""
    language: str = "zh"
    format: Any = None
    label_display_names: dict[str, str] = field(default_factory=dict)
    # Answer sentence: `{labels}` is the label list joined by `label_joiner`, or one fixed sentence per label.
    answer_template: str = ""
    label_sentences: dict[str, str] = field(default_factory=dict)
    label_joiner: str = "、"
    none_word: str = "无"  # written when a multi-label item has no label
    explanation_marker: str = "推理："
    explanation_sep: str = ""  # between the label sentence and the marker
    # Surface forms the parser accepts for each label, beside the label name itself.
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    positive: str | None = None  # binary tasks: the positive class
    parents: dict[str, tuple[str, ...]] = field(default_factory=dict)  # hierarchical: parent -> children
    child_sep: str = "-"  # hierarchical leaves written "父类-子类"
    aspects: tuple[str, ...] = ()
    case_sensitive: bool = True
    secondary_metrics: tuple[str, ...] = ()  # reported beside P/R/F1 (IMHI: accuracy, weighted F1)
    description: str = ""
    explanation_markers: tuple[str, ...] | None = None  # None: PARSER_DEFAULTS[language] (see parser_words)
    negations: tuple[str, ...] | None = None
    conclusion_markers: tuple[str, ...] | None = None
    parser_idioms: tuple[str, ...] | None = None
    contrasts: tuple[str, ...] | None = None
    choice_markers: tuple[str, ...] | None = None
    source: str = ""  # the file the task was read from (for error messages)

    def __post_init__(self) -> None:
        if not self.display_name:
            object.__setattr__(self, "display_name", self.name)
        problem = self._problem()
        if problem:
            where = f"{self.source}: " if self.source else ""
            raise ConfigError(f"{where}task {self.name}: {problem}")

    def _problem(self) -> str | None:
        if self.kind not in KINDS:
            return f"kind {self.kind!r} is not one of {', '.join(KINDS)}"
        if not self.name.isidentifier() or set(self.metric_keys) & RESERVED_NAMES:
            return f"a task name is an identifier (letters, digits, _) other than {', '.join(sorted(RESERVED_NAMES))}"
        if self.language not in LANGUAGES:
            return f"language {self.language!r} is not one of {', '.join(LANGUAGES)}"
        if "{post}" not in self.query_template:
            return "query_template has no {post} slot"
        if bool(self.aspects) != ("{aspect}" in self.query_template):
            return "aspects and an {aspect} slot in query_template go together"
        if not self.labels:
            return "no labels"
        if len(set(self.labels)) != len(self.labels):
            return "labels repeat"
        if self.kind == "binary" and (len(self.labels) != 2 or self.positive not in self.labels):
            return "a binary task needs two labels and `positive`, one of them"
        if self.kind == "hierarchical" and not self.parents:
            return "a hierarchical task needs `parents`"
        if self.label_sentences:
            missing = [lab for lab in self.labels if lab not in self.label_sentences]
            if missing or self.kind not in SINGLE_LABEL_KINDS:
                return f"label_sentences must give one sentence per label of a single-label task (missing {missing})"
        elif "{labels}" not in self.answer_template:
            return "answer_template has no {labels} slot (or give label_sentences)"
        known = set(self.labels) | set(self.children)
        for name, mapping in (("aliases", self.aliases), ("label_display_names", self.label_display_names)):
            unknown = [k for k in mapping if k not in known]
            if unknown:
                return f"{name} names {unknown}, which are not labels of the task"
        bad = [m for m in self.secondary_metrics if m not in SECONDARY_METRICS]
        if bad:
            return f"secondary_metrics {bad}: choose from {', '.join(SECONDARY_METRICS)}"
        return None

    # ------------------------------------------------------------------ derived
    @property
    def metric_keys(self) -> tuple[str, ...]:
        """Names of the result rows this task produces (a hierarchical task yields two: parent and child level)."""
        if self.kind == "hierarchical":
            return (f"{self.name}_parent", f"{self.name}_child")
        return (self.name,)

    @property
    def metric_display_names(self) -> dict[str, str]:
        if self.kind == "hierarchical":
            parent, child = self.metric_keys
            return {parent: f"{self.display_name} (parent)", child: f"{self.display_name} (child)"}
        return {self.name: self.display_name}

    @property
    def children(self) -> tuple[str, ...]:
        return tuple(c for kids in self.parents.values() for c in kids)

    @property
    def label_order(self) -> dict[str, int]:
        return {lab: i for i, lab in enumerate(self.labels)}

    def label_display_name(self, label: str) -> str:
        """English display name of a label (or leaf "父类-子类": its child's), else the label itself."""
        if label in self.label_display_names:
            return self.label_display_names[label]
        if self.kind == "hierarchical" and self.child_sep in label:
            parent, child = label.split(self.child_sep, 1)
            return self.label_display_names.get(child, child)
        return label

    def description_text(self) -> str:
        """The task description d of the paper's Eq. 1 as a prompt states it: the file's `description`, else the
        label set (a zero-shot model cannot answer a question whose labels it is not told)."""
        if self.description.strip():
            return self.description.strip()
        if self.language == "zh":
            return "可选标签：" + self.label_joiner.join(self.labels)
        return "Possible labels: " + ", ".join(self.labels)

    def parser_words(self, name: str) -> tuple[str, ...]:
        """One list of the parser's vocabulary: the task's own, else its language's (PARSER_DEFAULTS)."""
        own = getattr(self, name)
        return PARSER_DEFAULTS[self.language][name] if own is None else own

    def leaf(self, parent: str, child: str) -> str:
        return f"{parent}{self.child_sep}{child}"

    def parent_of(self, child: str) -> str:
        for p, kids in self.parents.items():
            if child in kids:
                return p
        raise KeyError(child)

    # ------------------------------------------------------------------ rendering
    def format_query(self, post: str, aspect: str = "") -> tuple[str, int, int]:
        """Return the query and the char span of the post inside it."""
        head, _, tail = self.query_template.partition("{post}")
        head, tail = head.replace("{aspect}", aspect), tail.replace("{aspect}", aspect)
        return head + post + tail, len(head), len(head) + len(post)

    def label_sentence(self, labels: list[str]) -> str:
        if self.label_sentences:
            if len(labels) != 1:
                raise ValueError(f"task {self.name} takes exactly one label, got {labels}")
            return self.label_sentences[labels[0]]
        ordered = self.order_labels(labels)
        return self.answer_template.format(labels=self.label_joiner.join(ordered) or self.none_word)

    def format_answer(self, labels: list[str], explanation: str | None = None) -> str:
        sentence = self.label_sentence(labels)
        if explanation:
            return f"{sentence}{self.explanation_sep}{self.explanation_marker}{explanation}"
        return sentence

    def order_labels(self, labels) -> list[str]:
        """Labels in the task's canonical order (unknown labels raise)."""
        order = self.label_order
        for lab in labels:
            if lab not in order:
                raise ValueError(f"label {lab!r} is not in task {self.name}'s label set")
        return sorted(set(labels), key=order.__getitem__)

    def with_templates(self, **overrides) -> Task:
        """A copy with user templates (from config) swapped in."""
        unknown = sorted(set(overrides) - set(TEMPLATE_FIELDS))
        if unknown:
            raise ConfigError(
                f"data.templates.{self.name}: unknown keys {unknown}; known: {', '.join(TEMPLATE_FIELDS)}"
            )
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------- reading task files
def task_from_spec(spec: Mapping[str, Any], source: str = "") -> Task:
    """Validate a task definition (a task file's content) against `TaskSpec` and build the `Task`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TaskSpec), OmegaConf.create(dict(spec)))
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{source or 'task definition'}: {first}") from None
    parents = {p: tuple(kids) for p, kids in data.pop("parents").items()}
    labels = tuple(data.pop("labels"))
    if data["kind"] == "hierarchical" and not labels:
        # Label set = the parents (a parent may be given without a child) plus every leaf "父类-子类".
        sep = data["child_sep"]
        labels = tuple(parents) + tuple(f"{p}{sep}{c}" for p, kids in parents.items() for c in kids)
    data["aliases"] = {k: tuple(v) for k, v in data["aliases"].items()}
    for key in ("aspects", "secondary_metrics"):
        data[key] = tuple(data[key])
    for key in PARSER_FIELDS:
        if data[key] is not None:
            data[key] = tuple(data[key])
    names = {f.name for f in fields(Task)}
    return Task(labels=labels, parents=parents, source=source, **{k: v for k, v in data.items() if k in names})


def load_task_file(path: str | Path) -> Task:
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task definition {path} does not exist")
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # YAML syntax
        raise ConfigError(f"{path}: not a readable YAML task definition ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a task definition is a mapping of fields")
    return task_from_spec(spec, str(path))


@lru_cache(maxsize=1)
def builtin_tasks() -> dict[str, Task]:
    """Every task file in conf/tasks, by name (file order: alphabetical)."""
    tasks = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        task = load_task_file(path)
        if task.name != path.stem:
            raise ConfigError(f"{path}: name {task.name!r} differs from the file name")
        tasks[task.name] = task
    return tasks


class _BuiltinTasks(Mapping):
    """`TASKS`: the built-in tasks, read from conf/tasks on first use."""

    def __getitem__(self, name: str) -> Task:
        return builtin_tasks()[name]

    def __iter__(self):
        return iter(builtin_tasks())

    def __len__(self) -> int:
        return len(builtin_tasks())


TASKS: Mapping[str, Task] = _BuiltinTasks()


def get_task(name: str, templates: Mapping | None = None, tasks: Mapping[str, Task] | None = None) -> Task:
    """Look a task up by name (among `tasks`, default the built-ins), with optional template overrides."""
    registry = TASKS if tasks is None else tasks
    try:
        task = registry[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(registry)}") from None
    return task.with_templates(**dict(templates or {}))


def resolve_tasks(entries: Mapping[str, Mapping | None], templates: Mapping | None = None) -> dict[str, Task]:
    """The tasks of a data config: each entry of `data.tasks` is a built-in task (by its key) or, with a
    `definition` (a task file path or an inline mapping), a task of the user's. Templates are applied."""
    templates = dict(templates or {})
    unknown = [name for name in templates if name not in entries]
    if unknown:
        raise ConfigError(f"data.templates names {unknown}, which are not tasks of this data config")
    out: dict[str, Task] = {}
    for key, entry in entries.items():
        definition = (entry or {}).get("definition")
        if definition is None:
            if key not in TASKS:
                raise ConfigError(
                    f"data.tasks.{key}: no built-in task is called {key!r} (built-in: "
                    f"{', '.join(TASKS)}); give data.tasks.{key}.definition=PATH to a task file"
                )
            task = TASKS[key]
        elif isinstance(definition, Mapping):
            task = task_from_spec(definition, f"data.tasks.{key}.definition")
        else:
            task = load_task_file(str(definition))
        if task.name != key:
            raise ConfigError(f"data.tasks.{key}: its definition is task {task.name!r}; the key must be the task name")
        out[key] = task.with_templates(**dict(templates.get(key) or {}))
    return out
