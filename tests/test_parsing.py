import time

import pytest

from mentalglm.scoring.parsing import ParseResult, answer_part, cp_parent_child_sets, parse_labels
from mentalglm.tasks import TASKS, get_task


def parse(task_name: str, text: str) -> ParseResult:
    return parse_labels(TASKS[task_name], text)


UNPARSED = ParseResult([], False)


# ----------------------------------------------------------------------------- every task's own answers


@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if t.kind in ("binary", "multiclass")])
def test_single_label_answers_roundtrip(name):
    task = TASKS[name]
    for label in task.labels:
        answer = task.format_answer([label], "some explanation that mentions other words")
        assert parse_labels(task, answer) == ParseResult([label], True), answer


@pytest.mark.parametrize("name", ["socialcd_3k", "cp"])
def test_multi_label_answers_roundtrip(name):
    task = TASKS[name]
    leaves = [lab for lab in task.labels if lab not in task.parents]
    for labels in ([leaves[0]], leaves[:3], leaves[-4:], leaves):
        answer = task.format_answer(labels, "解释。")
        assert parse_labels(task, answer) == ParseResult(task.order_labels(labels), True), answer


def test_multi_label_none_word_is_parsed_empty():
    for name in ("socialcd_3k", "cp"):
        task = TASKS[name]
        assert parse_labels(task, task.format_answer([], "解释。")) == ParseResult([], True)
        assert parse(name, "无") == ParseResult([], True)
        assert parse(name, "  无。") == ParseResult([], True)
    # "无" inside a word is not the none word.
    assert parse("socialcd_3k", "该帖子体现的认知歪曲：无法判断") == UNPARSED


# ----------------------------------------------------------------------------- SOS-HL-1K


@pytest.mark.parametrize(
    "text, label",
    [
        ("该帖子的发布者有高自杀风险。推理：低自杀风险的理由不足。", "高自杀风险"),
        ("\n\n  该帖子的发布者有低自杀风险。", "低自杀风险"),
        ("高风险", "高自杀风险"),
        ("自杀风险较低", "低自杀风险"),
        ("该帖子的发布者的自杀风险高", "高自杀风险"),
        ("该帖子的发布者有高自杀风险，而不是低自杀风险。", "高自杀风险"),  # earliest wins
        ("该帖子的发布者有高自杀风险，推理:xx", "高自杀风险"),
        ("该帖子的发布者有高自杀风险 推理 : 低自杀风险", "高自杀风险"),
    ],
)
def test_sos(text, label):
    assert parse("sos_hl_1k", text) == ParseResult([label], True)


@pytest.mark.parametrize("text", ["", "   \n", "无法判断", "无", "推理：高自杀风险", "I cannot answer."])
def test_sos_unparsed(text):
    assert parse("sos_hl_1k", text) == UNPARSED


# ----------------------------------------------------------------------------- SocialCD-3K


@pytest.mark.parametrize(
    "text, labels",
    [
        ("该帖子体现的认知歪曲：读心术、以偏概全。", ["以偏概全", "读心术"]),  # reversed order
        (
            "\n该帖子体现的认知歪曲：读心术，以偏概全,罪责归他;罪责归己；心理过滤/先知错误 乱贴标签。",
            ["以偏概全", "心理过滤", "读心术", "先知错误", "乱贴标签", "罪责归己", "罪责归他"],
        ),  # every separator
        ("该帖子体现的认知歪曲：读心术、读心术、读心术。", ["读心术"]),  # duplicates
        ("我认为主要是读心术，还有一些应该式的想法", ["读心术", "应该式"]),  # extra words
        ("该帖子体现的认知歪曲：放大和缩小、应该句式、全或无", ["非此即彼", "放大", "应该式"]),  # aliases
        ("该帖子体现的认知歪曲：情绪化推理。推理：这里提到读心术。", ["情绪化推理"]),  # label ending in 推理
        ("该帖子体现的认知歪曲：情绪化推理：放大。推理：读心术", ["放大", "情绪化推理"]),  # "情绪化推理：" is no marker
        ("该帖子体现的认知歪曲：读心术推理:乱贴标签", ["读心术"]),  # half-width marker
        ("该帖子体现的认知歪曲：以偏概全、读心术。", ["以偏概全", "读心术"]),  # full-width colon
        ("该帖子体现的认知歪曲：否定正面思考", ["否定正面思考"]),
    ],
)
def test_socialcd(text, labels):
    assert parse("socialcd_3k", text) == ParseResult(labels, True)


@pytest.mark.parametrize("text", ["", "该帖子体现的认知歪曲：", "推理：读心术", "abc"])
def test_socialcd_unparsed(text):
    assert parse("socialcd_3k", text) == UNPARSED


# ----------------------------------------------------------------------------- CP (hierarchical)


@pytest.mark.parametrize(
    "text, labels",
    [
        (
            "该句子体现的认知路径：认知歪曲-放大和缩小、情绪反应-情感效应。",
            ["认知歪曲-放大和缩小", "情绪反应-情感效应"],
        ),
        ("认知歪曲##放大和缩小", ["认知歪曲-放大和缩小"]),
        ("认知歪曲：放大和缩小", ["认知歪曲-放大和缩小"]),
        ("认知歪曲:放大和缩小", ["认知歪曲-放大和缩小"]),
        (
            "认知歪曲,认知歪曲##放大和缩小,情绪反应,情绪反应##行为效应",
            ["认知歪曲-放大和缩小", "情绪反应-行为效应"],
        ),  # raw data form
        ("放大和缩小", ["认知歪曲-放大和缩小"]),  # bare child implies its parent
        ("情感效应", ["情绪反应-情感效应"]),  # 情感 inside 情感效应 is no hit
        ("情感、情感效应", ["触发性事件-情感", "情绪反应-情感效应"]),
        ("触发性事件-情感", ["触发性事件-情感"]),
        ("认知歪曲、驳斥", ["认知歪曲", "驳斥"]),  # lone parents
        ("驳斥、驳斥-有效驳斥", ["驳斥-有效驳斥"]),  # a parent with a child found is not lone
        ("触发性事件：情感效应", ["触发性事件", "情绪反应-情感效应"]),  # the parent has no child here
        ("罪责归己/他", ["认知歪曲-罪责归己/他"]),
        ("认知歪曲-罪责归他", ["认知歪曲-罪责归己/他"]),
        (
            "\n\n情绪反应－行为效应，认知歪曲－应该句式，触发性事件－学习工作",
            ["触发性事件-学习工作", "认知歪曲-应该句式", "情绪反应-行为效应"],
        ),
        ("该句子体现的认知路径：认知歪曲-情绪化推理。推理：涉及有效驳斥", ["认知歪曲-情绪化推理"]),
        ("该句子体现的认知路径：认知歪曲-情绪化推理：驳斥-有效驳斥", ["认知歪曲-情绪化推理", "驳斥-有效驳斥"]),
    ],
)
def test_cp(text, labels):
    assert parse("cp", text) == ParseResult(labels, True)


def test_cp_unparsed_and_none():
    assert parse("cp", "该句子体现的认知路径：") == UNPARSED
    assert parse("cp", "推理：情感") == UNPARSED
    assert parse("cp", "该句子体现的认知路径：无。推理：无") == ParseResult([], True)


def test_cp_parent_child_sets():
    cp = TASKS["cp"]
    parents, children = cp_parent_child_sets(cp, ["认知歪曲-放大和缩小", "驳斥", "认知歪曲-罪责归己/他"])
    assert parents == {"认知歪曲", "驳斥"}
    assert children == {"放大和缩小", "罪责归己/他"}
    assert cp_parent_child_sets(cp, []) == (set(), set())
    with pytest.raises(ValueError, match="not in task cp"):
        cp_parent_child_sets(cp, ["情绪反应-放大和缩小"])


# ----------------------------------------------------------------------------- IMHI binary


@pytest.mark.parametrize(
    "text, label",
    [
        ("Yes, the poster suffers from depression. Reasoning: no.", "yes"),
        ("No, the poster does not suffer from depression. Reasoning: yes.", "no"),
        ("\n\n No, the poster does not suffer from depression.", "no"),
        ("no. the poster does not suffer", "no"),
        ("The poster does not suffer from depression.", "no"),  # alias sentence, no leading no
        ("The poster suffers from depression.", "yes"),
        ("YES", "yes"),
        ("Ｙｅｓ，the poster suffers from depression。", "yes"),  # full-width letters and punctuation
        ("It is not the case.", "no"),  # explicit alias "not"
        ("I know this is not depression", "no"),  # "know" does not count; "not" does
        ("I know, yes", "yes"),
        ("yes reasoning : no", "yes"),
        ("Yes REASONING: no", "yes"),
    ],
)
def test_dr(text, label):
    assert parse("dr", text) == ParseResult([label], True)


@pytest.mark.parametrize("text", ["I know.", "cannot say", "nothing here", "knot", "Reasoning: yes", "", "Noted."])
def test_dr_unparsed(text):
    assert parse("dr", text) == UNPARSED


@pytest.mark.parametrize(
    "name, yes, no",
    [
        ("dreaddit", "Yes, the poster suffers from stress.", "No, the poster does not suffer from stress."),
        ("loneliness", "Yes, the poster suffers from loneliness.", "No, the poster does not suffer from loneliness."),
        (
            "multiwd",
            "Yes, this wellness dimension exists in the post.",
            "No, this wellness dimension does not exist in the post.",
        ),
        ("irf", "Yes, the post shows this risk.", "No, the post does not show this risk."),
    ],
)
def test_imhi_yes_no(name, yes, no):
    assert parse(name, yes + " Reasoning: no") == ParseResult(["yes"], True)
    assert parse(name, no + " Reasoning: yes") == ParseResult(["no"], True)
    assert parse(name, "  " + no.lower()) == ParseResult(["no"], True)
    assert parse(name, "I don't know") == UNPARSED


# ----------------------------------------------------------------------------- IMHI multi-class


@pytest.mark.parametrize(
    "text, label",
    [
        ("This post shows the stress cause related to social relationships.", "social relationships"),
        ("This post shows the stress cause related to work. Reasoning: homework", "work"),
        ("This post shows the stress cause related to homework and school.", "school"),  # homework is not work
        ("This post shows other stress causes.", "other"),
        ("This post shows the stress cause related to financial problem.", "financial problem"),
        ("This post shows the stress cause related to family issues.", "family issues"),
        ("This post shows the stress cause related to everyday decision making.", "everyday decision making"),
        ("This post shows the stress cause related to emotion turmoil.", "emotion turmoil"),
        ("This post shows the stress cause related to health issues.", "health issues"),
        ("stress cause: decision-making", "everyday decision making"),
        ("Work, then school.", "work"),  # earliest wins
        ("  \nTHIS POST SHOWS THE STRESS CAUSE RELATED TO WORK.", "work"),
    ],
)
def test_sad(text, label):
    assert parse("sad", text) == ParseResult([label], True)


@pytest.mark.parametrize("text", ["homework", "workload networks", "This post shows stress.", "Reasoning: work"])
def test_sad_unparsed(text):
    assert parse("sad", text) == UNPARSED


@pytest.mark.parametrize(
    "text, label",
    [
        ("This post shows no causes of depression.", "none"),
        ("This post shows causes of depression related to relationship.", "relationship"),
        ("This post shows causes of depression related to jobs and career.", "jobs and career"),
        ("This post shows causes of depression related to bias or abuse.", "bias or abuse"),
        ("This post shows causes of depression related to medication.", "medication"),
        ("This post shows causes of depression related to alienation.", "alienation"),
        ("This post shows causes of depression related to  bias\nor   abuse.", "bias or abuse"),  # odd spaces
    ],
)
def test_cams(text, label):
    assert parse("cams", text) == ParseResult([label], True)


@pytest.mark.parametrize(
    "text, label",
    [
        ("This post shows no mental disorder symptoms.", "none"),
        ("This post shows mental disorder symptoms related to bipolar disorder.", "bipolar disorder"),
        ("This post shows mental disorder symptoms related to suicide.", "suicide"),
        ("This post shows mental disorder symptoms related to anxiety.", "anxiety"),
        ("This post shows mental disorder symptoms related to depression.", "depression"),
    ],
)
def test_swmh(text, label):
    assert parse("swmh", text) == ParseResult([label], True)


@pytest.mark.parametrize(
    "text, label",
    [
        ("This post shows no mental disorders.", "none"),
        ("This post shows suicide or self-harm tendency.", "suicide or self-harm tendency"),
        ("This post shows depression.", "depression"),
        ("This post shows PTSD. Reasoning: no mental disorders otherwise", "ptsd"),
    ],
)
def test_t_sid(text, label):
    assert parse("t_sid", text) == ParseResult([label], True)


# ----------------------------------------------------------------------------- misc


def test_answer_part():
    assert answer_part(TASKS["dr"], "Yes. REASONING: x") == "yes. "
    assert answer_part(TASKS["sos_hl_1k"], "高风险。推理：x") == "高风险。"
    assert answer_part(TASKS["sos_hl_1k"], "高风险。") == "高风险。"


def test_canonical_names_are_returned():
    # Matching is case-folded and NFKC-normalised; results are the task's own label names.
    assert parse("t_sid", "ptsd").labels == ["ptsd"]
    assert parse("swmh", "BIPOLAR").labels == ["bipolar disorder"]


def test_template_overrides_share_the_parser():
    task = get_task("sos_hl_1k", {"answer_template": "风险等级：{labels}"})
    assert parse_labels(task, task.format_answer(["高自杀风险"], "x")) == ParseResult(["高自杀风险"], True)


def test_garbage_is_unparsed_for_every_task():
    for task in TASKS.values():
        for text in ("", "??", "lorem ipsum dolor", "12345", "推理：", "Reasoning: "):
            assert parse_labels(task, text) == UNPARSED, (task.name, text)


def test_parsing_is_fast():
    cases = [
        ("socialcd_3k", "该帖子体现的认知歪曲：情绪化推理、以偏概全。推理：" + "这是一段解释。" * 60),
        ("dr", "Yes, the poster suffers from depression. Reasoning: " + "they say they feel low. " * 20),
        ("cp", "该句子体现的认知路径：认知歪曲-放大和缩小。推理：" + "解释" * 100),
        ("sad", "This post shows the stress cause related to work."),
    ]
    # CPU time of this process: the bound holds while other test workers load the machine (pytest -n 2).
    start = time.process_time()
    for _ in range(2500):
        for name, text in cases:
            parse(name, text)
    assert time.process_time() - start < 1.0


# ----------------------------------------------------------------------------- what real models write
# Outputs written for this project in the ways fine-tuned and zero-shot models answer (no real posts).
BOTH_MODES = [
    ("sos_hl_1k", "不是高自杀风险，而是低自杀风险。", ["低自杀风险"]),
    ("sos_hl_1k", "没有高自杀风险。", ["低自杀风险"]),
    ("sos_hl_1k", "并非高风险，属于低风险。", ["低自杀风险"]),
    ("sos_hl_1k", "该帖子的發布者有高自殺風險。", ["高自杀风险"]),
    ("sos_hl_1k", "毫无疑问是高自杀风险。", ["高自杀风险"]),
    ("sos_hl_1k", "该帖子的发布者有低自杀风险。推理过程：虽然提到高自杀风险的字眼，但没有计划。", ["低自杀风险"]),
    ("sos_hl_1k", "低自杀风险。\n**解释**：不是高自杀风险。", ["低自杀风险"]),
    ("sos_hl_1k", "低自杀风险\n### 推理\n帖子里说想死，高自杀风险的迹象……", ["低自杀风险"]),
    ("sos_hl_1k", "帖子里有压力，但不是高自杀风险，更像是低自杀风险的表现。", ["低自杀风险"]),
    ("socialcd_3k", "以偏概全，没有读心术，也不是罪责归己。", ["以偏概全"]),
    ("socialcd_3k", "该帖子包含的认知歪曲类型有：讀心術、亂貼標籤。", ["读心术", "乱贴标签"]),
    ("socialcd_3k", "帖子体现了以偏概全和乱贴标签，但并非读心术。推理：……", ["以偏概全", "乱贴标签"]),
    ("cp", "不是认知歪曲-放大和缩小，而是认知歪曲-以偏概全。", ["认知歪曲-以偏概全"]),
    ("dr", "The poster is not depressed.", ["no"]),
    ("dr", "No doubt about it: the poster suffers from depression.", ["yes"]),
    ("dr", "It is not entirely clear, but yes, the poster suffers from depression.", ["yes"]),
    ("dr", "Yes.\n\nExplanation: the poster is not depressed about work.", ["yes"]),
    (
        "swmh",
        "This post shows no signs of depression; it shows mental disorder symptoms related to anxiety.",
        ["anxiety"],
    ),
    ("sad", "The stress cause is not work but school.", ["school"]),
]
# Reasoning first, the verdict last: the strict parser reads only a label part before the explanation.
FREE_ONLY = [
    ("sos_hl_1k", "**推理**：帖子没有提到具体计划，也没有告别的话。\n\n**结论**：低自杀风险", ["低自杀风险"]),
    ("sos_hl_1k", "### 推理\n帖子描述了长期的痛苦，并提到了买药。\n### 结论\n高自杀风险", ["高自杀风险"]),
    ("sos_hl_1k", "推理：帖子表达了绝望，并写了遗言，因此属于高自杀风险。", ["高自杀风险"]),
    ("sos_hl_1k", "推理：帖子只是在抱怨工作。综上所述，该帖子的发布者有低自杀风险。", ["低自杀风险"]),
    (
        "socialcd_3k",
        "**推理**：他认为一次失败就代表一切，这是以偏概全；并不是读心术。\n**结论**：以偏概全",
        ["以偏概全"],
    ),
    (
        "dr",
        "**Reasoning:** the poster says nothing matters.\n**Conclusion:** Yes, the poster suffers from depression.",
        ["yes"],
    ),
    ("dreaddit", "Reasoning: deadlines and no sleep. In conclusion, the poster suffers from stress.", ["yes"]),
]


@pytest.mark.parametrize("mode", ["strict", "free"])
@pytest.mark.parametrize("name, text, labels", BOTH_MODES)
def test_negations_markers_and_traditional_characters(name, text, labels, mode):
    assert parse_labels(TASKS[name], text, mode) == ParseResult(labels, True), text


@pytest.mark.parametrize("name, text, labels", FREE_ONLY)
def test_free_mode_reads_conclusion_last_answers(name, text, labels):
    assert parse_labels(TASKS[name], text, "free") == ParseResult(labels, True)
    assert parse_labels(TASKS[name], text, "strict") == UNPARSED  # no label before the explanation


@pytest.mark.parametrize("mode", ["strict", "free"])
@pytest.mark.parametrize("name", list(TASKS))
def test_a_negated_label_is_never_predicted(name, mode):
    task = TASKS[name]
    negation = "不是" if task.language == "zh" else "it is not "
    for label in task.labels:
        if task.language == "en" and label in ("no", "none"):
            continue  # "not no" is no claim
        for term in (label, *task.aliases.get(label, ())):
            assert label not in parse_labels(task, f"{negation}{term}。推理：x", mode).labels, term


def test_chinese_labels_survive_traditional_to_simplified():
    from mentalglm.scoring.parsing import normalize

    for task in TASKS.values():
        if task.language == "zh":
            for term in (*task.labels, *task.children, *(a for al in task.aliases.values() for a in al)):
                assert normalize(task, term) == term, (task.name, term)


def test_a_task_file_replaces_the_parser_vocabulary():
    from mentalglm.tasks import task_from_spec

    spec = {
        "name": "mood",
        "kind": "binary",
        "labels": ["好", "坏"],
        "positive": "坏",
        "query_template": "{post}",
        "answer_template": "{labels}",
        "negations": ["绝非"],
        "explanation_markers": ["依我看"],
    }
    task = task_from_spec(spec)
    assert parse_labels(task, "绝非坏") == ParseResult(["好"], True)
    assert parse_labels(task, "不是坏") == ParseResult(["坏"], True)  # 不 is not a negation of this task
    assert parse_labels(task, "好。依我看：坏") == ParseResult(["好"], True)
    with pytest.raises(ValueError, match="parser mode 'loose'"):
        parse_labels(task, "好", "loose")


# ----------------------------------------------------------------------------- option lists
CHOICE = {"zh": "正确答案：", "en": "Correct answer: "}


def options_text(task, labels, sep=" ") -> str:
    return sep.join(f"{key}. {label}" for key, label in zip("ABCDEFGHIJ", labels))


@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if t.kind in ("binary", "multiclass")])
def test_a_stated_choice_reads_as_its_option_for_every_label(name):
    task = TASKS[name]
    for i, label in enumerate(task.labels):
        for sep, after in ((" ", " "), ("\n", "\n")):
            text = options_text(task, task.labels, sep) + after + CHOICE[task.language] + "ABCDEFGHIJ"[i]
            for mode in ("strict", "free"):
                result = parse_labels(task, text, mode)
                assert (result, result.rule) == (ParseResult([label], True), "choice"), (mode, text)
        listed = options_text(task, task.labels)
        assert parse_labels(task, listed).reason == "options without a choice"


LEAVES = ["触发性事件-生活", "认知歪曲-以偏概全"]


@pytest.mark.parametrize(
    "name,text,labels",
    [
        # the choice after the reasoning (strict mode reads the label part first, then looks past the marker)
        ("sos_hl_1k", "A. 低自杀风险 B. 高自杀风险 推理：帖子写道不想活了，多次提到告别。正确答案：B", ["高自杀风险"]),
        ("sos_hl_1k", "选项：A高自杀风险 B低自杀风险\n答案：A。", ["高自杀风险"]),
        ("sos_hl_1k", "（1）低自杀风险（2）高自杀风险\n我选（2），因为帖子提到了具体计划。", ["高自杀风险"]),
        ("dr", "A) Yes B) No\nReasoning: the poster mostly describes a busy week.\nCorrect answer: B) No", ["no"]),
        ("dr", "a) yes b) no. I choose a because the post talks about hopelessness.", ["yes"]),
        ("swmh", "Options: (A) none (B) depression (C) suicide\nThe answer is (C).", ["suicide"]),
        ("socialcd_3k", "A. 非此即彼 B. 以偏概全 C. 读心术\n答案：A、C", ["非此即彼", "读心术"]),
        ("socialcd_3k", "A. 非此即彼\nB. 以偏概全\nC. 读心术\n正确答案：以偏概全", ["以偏概全"]),
        ("cp", "A. 触发性事件-生活 B. 认知歪曲-以偏概全 C. 情绪反应 答案：A和B", LEAVES),
    ],
)
def test_option_lists_in_real_answers_read_the_stated_choice(name, text, labels):
    for mode in ("strict", "free"):
        result = parse_labels(TASKS[name], text, mode)
        # free parsing may meet the choice as a conclusion ("答案：A", "Correct answer: B") first
        rules = ("choice",) if mode == "strict" else ("choice", "conclusion")
        assert result == ParseResult(labels, True) and result.rule in rules, (mode, result)


@pytest.mark.parametrize(
    "name,text",
    [
        ("sos_hl_1k", "A. 高自杀风险 B. 低自杀风险 推理：帖子中多次提到“活着没意思”，但也提到会去看医生。"),
        ("dr", "A. Yes, the poster suffers from depression. B. No. Reasoning: The post is ambiguous about mood."),
        ("sad", "1. school 2. work 3. financial problem\nThe post is about money and exams."),
        ("socialcd_3k", "选项：A. 非此即彼 B. 读心术 C. 乱贴标签"),
        ("sos_hl_1k", "A. 低自杀风险 B. 高自杀风险\n答案：C"),  # a choice of no listed option
    ],
)
def test_options_without_a_choice_are_no_answer(name, text):
    for mode in ("strict", "free"):
        result = parse_labels(TASKS[name], text, mode)
        assert result == UNPARSED and result.reason == "options without a choice", (mode, result)


def test_a_multi_label_answer_may_number_its_labels():
    result = parse("cp", "1. 触发性事件-生活\n2. 认知歪曲-以偏概全\n推理：帖子提到房租上涨。")
    assert result == ParseResult(["触发性事件-生活", "认知歪曲-以偏概全"], True) and result.rule == "stated"


def test_every_reading_names_its_rule():
    sos, cp = TASKS["sos_hl_1k"], TASKS["cp"]
    assert parse_labels(sos, "该帖子的发布者有高自杀风险。").rule == "stated"
    assert parse_labels(sos, "发布者并没有高自杀风险。").rule == "negation"
    assert parse_labels(cp, "该句子体现的认知路径：无。").rule == "none"
    assert parse_labels(sos, "分析：帖子很长。**结论**：低自杀风险", "free").rule == "conclusion"
    assert parse_labels(sos, "我不知道。").reason == "no label found"


# ----------------------------------------------------------------------------- negation as scope
WRITTEN_AS_NAMED = ["sos_hl_1k", "socialcd_3k", "cp", "dr", "dreaddit", "sad", "swmh", "t_sid", "cams"]


def negated_text(task, cue: str, label: str) -> str:
    if task.language == "zh":
        return f"从帖子来看，{cue}{label}。"
    return f"From the post, there is {cue} {label}."


@pytest.mark.parametrize("name", WRITTEN_AS_NAMED)
def test_every_negation_cue_scopes_over_every_label(name):
    task = TASKS[name]
    labels = [lab for lab in task.labels if task.kind != "hierarchical" or "-" in lab]
    cues = task.parser_words("negations")
    for cue in cues:
        for label in (lab for lab in labels if lab not in cues):  # IMHI's "no" is a label and a cue
            result = parse_labels(task, negated_text(task, cue, label), "free")
            assert label not in result.labels, (cue, label, result)
            if task.kind == "binary":
                assert result.labels == [lab for lab in task.labels if lab != label], (cue, label, result)


@pytest.mark.parametrize(
    "name,text,labels",
    [
        # contrast: the negation ends at 而是 / but / rather
        ("sos_hl_1k", "这不是低自杀风险而是高自杀风险。", ["高自杀风险"]),
        ("socialcd_3k", "帖子并非非此即彼，但是体现了读心术。", ["读心术"]),
        ("swmh", "The post shows no depression but suicide.", ["suicide"]),
        ("sad", "The stressor is not school, rather work.", ["work"]),
        # double negation
        ("sos_hl_1k", "不能排除高自杀风险。", ["高自杀风险"]),
        ("sos_hl_1k", "并不是没有高自杀风险。", ["高自杀风险"]),
        # cues beyond single words
        ("sos_hl_1k", "从帖子内容看，远非高自杀风险。", ["低自杀风险"]),
        ("socialcd_3k", "帖子中无从判断读心术，主要体现以偏概全。", ["以偏概全"]),
        ("swmh", "The post is far from depression; it describes ordinary stress at work.", []),
        ("swmh", "The poster is free of suicide thoughts; the post speaks of depression.", ["depression"]),
    ],
)
def test_contrast_and_double_negation_read_as_a_careful_reader_would(name, text, labels):
    assert parse_labels(TASKS[name], text, "free").labels == labels
