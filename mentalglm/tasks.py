"""The one place that defines every task: labels, prompt and answer formats, parser vocabulary, metric.

Everything else (loaders, instruction building, validation, evaluate.py, reports) reads a `Task`
from `TASKS`. Adding a dataset means adding one `Task` here plus its `conf/data` entry.

Record schema shared by every loader (one row of a `datasets.Dataset`):
    task      task name (a key of TASKS)
    id        stable item id, unique within (task, split)
    query     the full instruction text (post embedded)
    answer    the gold answer: label sentence, then the explanation marker and explanation if any
    labels    gold labels, list of label names of the task (for cp: leaves "父类-子类" or a lone parent)
    aspect    MultiWD/IRF aspect asked about ("" for other tasks)
    post_start, post_end   char span of the post inside `query` (-1, -1 when unknown); truncation
                           cuts only inside this span
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Kind = Literal["binary", "multiclass", "multilabel", "hierarchical"]

RECORD_FIELDS = ("task", "id", "query", "answer", "labels", "aspect", "post_start", "post_end")


@dataclass(frozen=True)
class Task:
    name: str
    group: Literal["c_imhi", "imhi"]
    kind: Kind
    labels: tuple[str, ...]
    # Query with a `{post}` slot (and `{aspect}` for aspect tasks); "{question}" is already filled in.
    query_template: str
    # Answer sentence. C-IMHI: `{labels}` is the label list joined by `label_joiner`.
    # IMHI: one fixed sentence per label in `label_sentences`.
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
    # MentaLLaMA reports weighted F1 + accuracy for IMHI; the paper reports P/R/F1 for C-IMHI.
    imhi_style_metrics: bool = False

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """Names of the result rows this task produces (cp yields two: parent and child level)."""
        if self.kind == "hierarchical":
            return (f"{self.name}_parent", f"{self.name}_child")
        return (self.name,)

    @property
    def children(self) -> tuple[str, ...]:
        return tuple(c for kids in self.parents.values() for c in kids)

    def leaf(self, parent: str, child: str) -> str:
        return f"{parent}{self.child_sep}{child}"

    def parent_of(self, child: str) -> str:
        for p, kids in self.parents.items():
            if child in kids:
                return p
        raise KeyError(child)

    def format_query(self, post: str, aspect: str = "") -> tuple[str, int, int]:
        """Return the query and the char span of the post inside it."""
        head, _, tail = self.query_template.partition("{post}")
        head, tail = head.replace("{aspect}", aspect), tail.replace("{aspect}", aspect)
        return head + post + tail, len(head), len(head) + len(post)

    def format_answer(self, labels: list[str], explanation: str | None = None) -> str:
        if self.label_sentences:
            if len(labels) != 1:
                raise ValueError(f"task {self.name} takes exactly one label, got {labels}")
            sentence = self.label_sentences[labels[0]]
        else:
            ordered = self.order_labels(labels)
            sentence = self.answer_template.format(labels=self.label_joiner.join(ordered) or self.none_word)
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

    @property
    def label_order(self) -> dict[str, int]:
        return {lab: i for i, lab in enumerate(self.labels)}

    def with_templates(self, **overrides) -> "Task":
        """A copy with user templates (from config) swapped in."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------- C-IMHI (Chinese)

SOS_HL_1K = Task(
    name="sos_hl_1k",
    group="c_imhi",
    kind="binary",
    labels=("低自杀风险", "高自杀风险"),
    positive="高自杀风险",
    query_template="考虑以下帖子：\"{post}\" 问题：这个帖子的发布者的自杀风险是高还是低？",
    answer_template="该帖子的发布者有{labels}。",
    aliases={"低自杀风险": ("低风险", "自杀风险低", "风险较低", "风险低"), "高自杀风险": ("高风险", "自杀风险高", "风险较高", "风险高")},
)

SOCIALCD_3K = Task(
    name="socialcd_3k",
    group="c_imhi",
    kind="multilabel",
    labels=("非此即彼", "以偏概全", "心理过滤", "否定正面思考", "读心术", "先知错误",
            "放大", "情绪化推理", "应该式", "乱贴标签", "罪责归己", "罪责归他"),
    query_template="考虑以下帖子：\"{post}\" 问题：这个帖子体现了哪些认知歪曲？",
    answer_template="该帖子体现的认知歪曲：{labels}。",
    aliases={"应该式": ("应该句式",), "放大": ("放大和缩小",), "非此即彼": ("全或无",)},
)

_CP_PARENTS = {
    "触发性事件": ("疾病症状", "社会关系", "生活", "学习工作", "情感"),
    "认知歪曲": ("非此即彼", "以偏概全", "心理过滤", "否定正面思考", "妄下结论", "放大和缩小",
                 "情绪化推理", "应该句式", "乱贴标签", "罪责归己/他"),
    "情绪反应": ("情感效应", "行为效应"),
    "驳斥": ("习惯性驳斥", "有效驳斥"),
}

CP = Task(
    name="cp",
    group="c_imhi",
    kind="hierarchical",
    # Label set = leaves "父类-子类" plus the four parents (a parent may be given without a child).
    labels=tuple(p for p in _CP_PARENTS)
    + tuple(f"{p}-{c}" for p, kids in _CP_PARENTS.items() for c in kids),
    parents=_CP_PARENTS,
    query_template="考虑以下句子：\"{post}\" 问题：这个句子体现了哪些认知路径？",
    answer_template="该句子体现的认知路径：{labels}。",
    aliases={"罪责归己/他": ("罪责归己", "罪责归他", "罪责归己或他")},
)

# ----------------------------------------------------------------------------- IMHI (English)

_IMHI = dict(group="imhi", explanation_marker="Reasoning: ", explanation_sep=" ", case_sensitive=False,
             imhi_style_metrics=True)
_IMHI_QUERY = 'Consider this post: "{post}" Question: '


def _yes_no(name: str, question: str, yes: str, no: str, aspects: tuple[str, ...] = ()) -> Task:
    return Task(
        name=name,
        kind="binary",
        labels=("no", "yes"),
        positive="yes",
        query_template=_IMHI_QUERY + question,
        label_sentences={"yes": yes, "no": no},
        # First hit by position wins for single-label tasks, so "No, ... does not ..." reads "no".
        aliases={"yes": ("yes", yes.split(", ", 1)[1].rstrip(".")),
                 "no": ("no", "not", no.split(", ", 1)[1].rstrip("."))},
        aspects=aspects,
        **_IMHI,
    )


def _multiclass(name: str, question: str, sentences: dict[str, str], aliases: dict) -> Task:
    return Task(name=name, kind="multiclass", labels=tuple(sentences), query_template=_IMHI_QUERY + question,
                label_sentences=sentences, aliases=aliases, **_IMHI)


DR = _yes_no("dr", "Does the poster suffer from depression?",
             "Yes, the poster suffers from depression.", "No, the poster does not suffer from depression.")
DREADDIT = _yes_no("dreaddit", "Does the poster suffer from stress?",
                   "Yes, the poster suffers from stress.", "No, the poster does not suffer from stress.")
LONELINESS = _yes_no("loneliness", "Does the poster suffer from loneliness?",
                     "Yes, the poster suffers from loneliness.", "No, the poster does not suffer from loneliness.")
MULTIWD = _yes_no("multiwd", "Does the {aspect} wellness dimension exist in the post?",
                  "Yes, this wellness dimension exists in the post.",
                  "No, this wellness dimension does not exist in the post.",
                  aspects=("spiritual", "physical", "intellectual", "social", "vocational", "emotional"))
IRF = _yes_no("irf", "Does the post show risk of {aspect}?",
              "Yes, the post shows this risk.", "No, the post does not show this risk.",
              aspects=("thwarted belongingness", "perceived burdensomeness"))

_SAD_CAUSES = ("school", "financial problem", "family issues", "social relationships", "work",
               "health issues", "emotion turmoil", "everyday decision making")
SAD = _multiclass(
    "sad", "What is the stress cause of this post?",
    {**{c: f"This post shows the stress cause related to {c}." for c in _SAD_CAUSES},
     "other": "This post shows other stress causes."},
    {"other": ("other stress cause", "other cause", "other causes"),
     "financial problem": ("financial problems", "finance", "financial"),
     "family issues": ("family issue", "family"),
     "social relationships": ("social relationship", "relationships", "relationship"),
     "health issues": ("health issue", "health"),
     "emotion turmoil": ("emotional turmoil", "emotions"),
     "everyday decision making": ("decision making", "decision-making")},
)
_CAMS_CAUSES = ("bias or abuse", "jobs and career", "medication", "relationship", "alienation")
CAMS = _multiclass(
    "cams", "What cause of depression does this post show?",
    {"none": "This post shows no causes of depression.",
     **{c: f"This post shows causes of depression related to {c}." for c in _CAMS_CAUSES}},
    {"none": ("no causes", "no cause", "no specific cause"),
     "bias or abuse": ("bias", "abuse"),
     "jobs and career": ("jobs and careers", "job and career", "jobs", "career"),
     "medication": ("medications", "medical"),
     "relationship": ("relationships",),
     "alienation": ("alienated",)},
)
_SWMH = ("depression", "suicide", "anxiety", "bipolar disorder")
SWMH = _multiclass(
    "swmh", "What mental disorder symptoms does this post show?",
    {"none": "This post shows no mental disorder symptoms.",
     **{c: f"This post shows mental disorder symptoms related to {c}." for c in _SWMH}},
    {"none": ("no mental disorder", "no mental disorders"), "suicide": ("suicidal",), "bipolar disorder": ("bipolar",)},
)
T_SID = _multiclass(
    "t_sid", "What mental disorder does this post show?",
    {"none": "This post shows no mental disorders.",
     "suicide or self-harm tendency": "This post shows suicide or self-harm tendency.",
     "depression": "This post shows depression.",
     "ptsd": "This post shows PTSD."},
    # Plural alias: the gold sentence is "This post shows no mental disorders." and English matches need word ends.
    {"none": ("no mental disorder", "no mental disorders"), "suicide or self-harm tendency": ("suicide", "self-harm", "suicidal"),
     "ptsd": ("post-traumatic",)},
)

TASKS: dict[str, Task] = {
    t.name: t
    for t in (SOS_HL_1K, SOCIALCD_3K, CP, DR, DREADDIT, LONELINESS, SWMH, T_SID, SAD, CAMS, MULTIWD, IRF)
}
C_IMHI_TASKS = tuple(n for n, t in TASKS.items() if t.group == "c_imhi")
IMHI_TASKS = tuple(n for n, t in TASKS.items() if t.group == "imhi")


def get_task(name: str, templates: dict | None = None) -> Task:
    """Look a task up by name, with optional template overrides (query_template, answer_template, ...)."""
    try:
        task = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
    return task.with_templates(**(templates or {}))
