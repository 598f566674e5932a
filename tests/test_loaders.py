import csv
import io
import json

import pytest

from mentalglm.data.io import DataError, LoadReport
from mentalglm.data.loaders import FORMATS, detect_format, load_records
from mentalglm.data.paths import FIXTURES_DIR
from mentalglm.tasks import RECORD_FIELDS, TASKS, get_task

F = FIXTURES_DIR
IMHI = [n for n, t in TASKS.items() if t.format == "imhi_instruction"]
LABELS = "\t".join(TASKS["socialcd_3k"].labels)


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def imhi_csv(rows, header=("query", "gpt-3.5-turbo")):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


def bad(tmp_path, name, text, line, field, reason=None, task=None, fmt=None, encoding="utf-8"):
    """Load a bad file and check the error names file, line and field."""
    path = write(tmp_path, name, text, encoding)
    with pytest.raises(DataError) as e:
        load_records(task, path, fmt)
    msg = str(e.value)
    assert name in msg and f"line {line}," in msg and f"field {field!r}" in msg, msg
    assert (e.value.line, e.value.field) == (line, field)
    if reason:
        assert reason in msg, msg
    return e.value


def check_records(records):
    for r in records:
        assert tuple(r) == RECORD_FIELDS
        task = TASKS[r["task"]]
        assert isinstance(r["id"], str) and r["labels"] == task.order_labels(r["labels"])
        if r["post_start"] >= 0:
            assert 0 < r["post_start"] < r["post_end"] <= len(r["query"])
        assert (r["aspect"] != "") == bool(task.aspects)
    ids = [(r["task"], r["id"]) for r in records]
    assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------- fixtures, every format


@pytest.mark.parametrize(
    "rel,fmt,n",
    [
        ("sos_hl_1k/suicide_train_LLM.csv", "sos_llm", 80),
        ("sos_hl_1k/suicide_val_LLM.csv", "sos_llm", 30),
        ("sos_hl_1k/suicide_train_BERT.tsv", "sos_bert", 80),
        ("socialcd_3k/train_data_with_header.tsv", "socialcd", 240),
        ("socialcd_3k/test_data_with_header.tsv", "socialcd", 40),
        ("cp/train.txt", "cp", 200),
        ("cp/val.txt", "cp", 30),
        ("cp/test.txt", "cp", 30),
        ("instructions/c_imhi_alpaca.json", "alpaca", 10),
        ("instructions/c_imhi_chat.jsonl", "chat", 10),
    ],
)
def test_fixture_raw_and_instruction_files(rel, fmt, n):
    records = load_records(None, F / rel)
    assert len(records) == n
    assert records == load_records(None, F / rel, fmt)  # autodetected the same format
    check_records(records)


@pytest.mark.parametrize("task", IMHI)
def test_fixture_imhi_instruction(task):
    t = TASKS[task]
    for split, n in (("train", 30), ("val", 10)):
        records = load_records(task, F / "imhi" / task / f"{split}.csv")
        assert len(records) == n and {r["task"] for r in records} == {task}
        check_records(records)
        for r in records:
            post = r["query"][r["post_start"] : r["post_end"]]
            assert t.format_query(post, r["aspect"]) == (r["query"], r["post_start"], r["post_end"])
            assert r["answer"].startswith(t.label_sentences[r["labels"][0]] + " Reasoning: ")
    if t.aspects:
        assert len({r["aspect"] for r in load_records(task, F / "imhi" / task / "train.csv")}) > 1


def test_fixture_binary_tasks_are_balanced():
    for rel in ("sos_hl_1k/suicide_train_LLM.csv", "sos_hl_1k/suicide_val_LLM.csv"):
        labels = [r["labels"][0] for r in load_records(None, F / rel)]
        assert labels.count("高自杀风险") == labels.count("低自杀风险")


def test_fixture_llm_and_bert_are_the_same_items():
    for split in ("train", "val"):
        llm = load_records("sos_hl_1k", F / f"sos_hl_1k/suicide_{split}_LLM.csv")
        bert = load_records("sos_hl_1k", F / f"sos_hl_1k/suicide_{split}_BERT.tsv")
        assert llm == bert


def test_fixture_complete_form_equals_instruction_form():
    assert load_records("sad", F / "imhi/complete/sad_val.csv") == load_records("sad", F / "imhi/sad/val.csv")


def test_sos_record_shape():
    r = load_records("sos_hl_1k", F / "sos_hl_1k/suicide_train_LLM.csv")[0]
    t = TASKS["sos_hl_1k"]
    post = r["query"][r["post_start"] : r["post_end"]]
    assert r["id"] == "1" and r["aspect"] == ""
    assert (r["query"], r["post_start"], r["post_end"]) == t.format_query(post)
    assert r["answer"] == t.format_answer(r["labels"])


def test_detect_format():
    expected = {
        "suicide_train_LLM.csv": "sos_llm",
        "suicide_train_BERT.tsv": "sos_bert",
        "train.txt": "cp",
        "train_data_with_header.tsv": "socialcd",
        "c_imhi_alpaca.json": "alpaca",
        "c_imhi_chat.jsonl": "chat",
        "sad_val.csv": "imhi_complete",
    }
    for path in F.rglob("*"):
        if path.name in expected:
            assert detect_format(path, path.read_bytes().decode("utf-8", "replace")) == expected[path.name]
    assert detect_format(F / "imhi/dr/train.csv", (F / "imhi/dr/train.csv").read_text()) == "imhi_instruction"


def test_unknown_format_and_missing_task(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        load_records("dr", F / "imhi/dr/train.csv", "excel")
    with pytest.raises(ValueError, match="needs a task"):
        load_records(None, F / "imhi/dr/train.csv")
    with pytest.raises(ValueError, match="not an IMHI task"):
        load_records("sos_hl_1k", F / "imhi/dr/train.csv")
    with pytest.raises(ValueError, match="labels"):
        load_records("dr", F / "sos_hl_1k/suicide_train_LLM.csv")
    assert set(FORMATS) == {
        "sos_llm",
        "sos_bert",
        "socialcd",
        "cp",
        "imhi_instruction",
        "imhi_complete",
        "alpaca",
        "chat",
    }


def test_missing_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records("sos_hl_1k", tmp_path / "typo.csv")


def test_template_override():
    t = get_task("sos_hl_1k", {"query_template": "帖子：{post}\n风险？", "answer_template": "风险：{labels}"})
    r = load_records(t, F / "sos_hl_1k/suicide_train_LLM.csv")[0]
    assert r["query"].startswith("帖子：") and r["query"].endswith("\n风险？")
    assert r["answer"].startswith("风险：") and r["post_start"] == 3


# ----------------------------------------------------------------------------- SOS-HL-1K LLM


SOS_HEAD = "id\tlabel\tcomment\r\n"


def test_sos_llm_quoted_field_and_blank_lines(tmp_path):
    path = write(tmp_path, "q.csv", SOS_HEAD + '1\t1\t"他说""再见""，想死"\r\n\r\n2\t0\t好累\r\n')
    records = load_records(None, path)
    assert [r["query"][r["post_start"] : r["post_end"]] for r in records] == ['他说"再见"，想死', "好累"]
    assert [r["labels"] for r in records] == [["高自杀风险"], ["低自杀风险"]]


def test_sos_llm_wrong_column_count(tmp_path):
    bad(tmp_path, "cols.csv", SOS_HEAD + "1\t0\t好累\r\n2\t1\r\n", 3, "columns", "malformed line")


def test_sos_llm_label_outside_set(tmp_path):
    bad(tmp_path, "lab.csv", SOS_HEAD + "1\t0\t好累\r\n2\t2\t想死\r\n", 3, "label", "label outside the label set")


def test_sos_llm_empty_post(tmp_path):
    bad(tmp_path, "empty_post.csv", SOS_HEAD + "1\t0\t  \r\n", 2, "comment", "empty post")


def test_sos_llm_missing_column(tmp_path):
    bad(tmp_path, "head.csv", "id\tlabel\ttext\r\n1\t0\t好累\r\n", 1, "comment", "missing column", fmt="sos_llm")


def test_sos_llm_duplicate_id(tmp_path):
    e = bad(tmp_path, "dup.csv", SOS_HEAD + "7\t0\t好累\r\n8\t1\t想死\r\n7\t0\t失眠\r\n", 4, "id", "duplicate id")
    assert "line 2" in e.detail


def test_sos_llm_unbalanced_quote(tmp_path):
    # The quote would swallow the following lines into one post; caught as a malformed line.
    bad(tmp_path, "quote.csv", SOS_HEAD + '1\t0\t"好累\r\n2\t1\t想死\r\n3\t0\t失眠\r\n', 2, "columns", "malformed line")


def test_sos_llm_undecodable_bytes_name_the_column(tmp_path):
    path = tmp_path / "bytes.csv"
    path.write_bytes((SOS_HEAD + "1\t0\t好累\r\n").encode() + b"2\t1\t\xff\xfe\r\n")
    with pytest.raises(DataError) as e:
        load_records(None, path)
    assert (e.value.line, e.value.field) == (3, "comment") and "bytes.csv" in str(e.value)
    assert "undecodable bytes" in str(e.value)


def test_empty_file(tmp_path):
    path = write(tmp_path, "empty.csv", "")
    with pytest.raises(DataError, match="empty file") as e:
        load_records("sos_hl_1k", path, "sos_llm")
    assert "empty.csv" in str(e.value) and "line 1" in str(e.value)


@pytest.mark.parametrize("fixture", ["sos_hl_1k/suicide_val_LLM.csv", "socialcd_3k/test_data_with_header.tsv"])
def test_a_header_only_file_is_as_empty_as_an_empty_file(tmp_path, fixture):
    # 0 test items must not pass for a result (a train_classifier run once wrote metrics without a test split)
    header = (FIXTURES_DIR / fixture).read_bytes().splitlines(keepends=True)[0]
    path = tmp_path / fixture.split("/")[-1]
    path.write_bytes(header)
    with pytest.raises(DataError, match="a header and no rows") as e:
        load_records(None, path)
    assert path.name in str(e.value) and "line 1" in str(e.value)
    assert load_records(None, write(tmp_path, "h.csv", SOS_HEAD + "1\t0\t好累\r\n"))  # one row: fine


# ----------------------------------------------------------------------------- SOS-HL-1K BERT


def test_sos_bert_both_flags(tmp_path):
    bad(tmp_path, "b.tsv", "0\t1\t好累\r\n1\t1\t想死\r\n", 2, "is_high", "exactly one", encoding="gbk")


def test_sos_bert_not_binary(tmp_path):
    bad(tmp_path, "b.tsv", "0\t1\t好累\r\n1\tx\t想死\r\n", 2, "is_low", "not 0/1", fmt="sos_bert", encoding="gbk")


def test_sos_bert_columns_and_empty_text(tmp_path):
    bad(tmp_path, "c.tsv", "0\t1\t好累\r\n1\t0\r\n", 2, "columns", fmt="sos_bert", encoding="gbk")
    bad(tmp_path, "d.tsv", "0\t1\t好累\r\n1\t0\t \r\n", 2, "text", "empty post", encoding="gbk")


def test_sos_bert_ids_are_row_numbers(tmp_path):
    path = write(tmp_path, "ids.tsv", "0\t1\t好累\r\n\r\n1\t0\t想死\r\n", "gbk")
    assert [r["id"] for r in load_records(None, path)] == ["1", "2"]


# ----------------------------------------------------------------------------- SocialCD-3K


def test_socialcd_labels_and_ids(tmp_path):
    row = ["0"] * 12
    row[0], row[11] = "1", "1"
    path = write(tmp_path, "s.tsv", f"{LABELS}\t内容\n{chr(9).join(row)}\t全角，标点！\n")
    (r,) = load_records(None, path)
    assert r["labels"] == ["非此即彼", "罪责归他"] and r["id"] == "1"
    assert r["answer"] == "该帖子体现的认知歪曲：非此即彼、罪责归他。"
    assert r["query"][r["post_start"] : r["post_end"]] == "全角，标点！"


def test_socialcd_unknown_label_column(tmp_path):
    header = LABELS.replace("放大", "缩小")
    bad(tmp_path, "u.tsv", f"{header}\t内容\n" + "0\t" * 12 + "好\n", 1, "缩小", "label outside the label set")


def test_socialcd_missing_post_column(tmp_path):
    path = write(tmp_path, "m.tsv", f"{LABELS}\ttext\n" + "0\t" * 12 + "好\n")
    with pytest.raises(DataError) as e:
        load_records("socialcd_3k", path, "socialcd")
    assert (e.value.line, e.value.field, e.value.reason) == (1, "text", "label outside the label set")
    path = write(tmp_path, "m2.tsv", "\t".join(TASKS["socialcd_3k"].labels[:-1]) + "\t内容\n" + "0\t" * 11 + "好\n")
    with pytest.raises(DataError) as e:
        load_records("socialcd_3k", path, "socialcd")
    assert (e.value.line, e.value.field, e.value.reason) == (1, "罪责归他", "missing column")
    assert "m2.tsv" in str(e.value)


def test_socialcd_value_not_binary(tmp_path):
    bad(
        tmp_path,
        "v.tsv",
        f"{LABELS}\t内容\n" + "0\t" * 12 + "好\n" + "0\t2\t" + "0\t" * 10 + "坏\n",
        3,
        "以偏概全",
        "not 0/1",
    )


def test_socialcd_empty_post_and_columns(tmp_path):
    bad(tmp_path, "e.tsv", f"{LABELS}\t内容\n" + "1\t" + "0\t" * 11 + "\n", 2, "内容", "empty post")
    bad(tmp_path, "c.tsv", f"{LABELS}\t内容\n" + "1\t" + "0\t" * 10 + "好\n", 2, "columns", "malformed line")


# ----------------------------------------------------------------------------- CP


def test_cp_leaves_and_lone_parents(tmp_path):
    text = (
        "考试没考好，我是废物\t认知歪曲,认知歪曲##放大和缩小,情绪反应,情绪反应##行为效应,驳斥\n"
        "全是我的错\t认知歪曲，认知歪曲##罪责归己/他\n"
    )
    r1, r2 = load_records(None, write(tmp_path, "cp.txt", text))
    assert r1["labels"] == ["驳斥", "认知歪曲-放大和缩小", "情绪反应-行为效应"]
    assert r2["labels"] == ["认知歪曲-罪责归己/他"]
    assert r1["answer"] == "该句子体现的认知路径：驳斥、认知歪曲-放大和缩小、情绪反应-行为效应。"


def test_cp_unknown_parent(tmp_path):
    bad(tmp_path, "p.txt", "好\t驳斥\n坏\t认知错误,认知错误##以偏概全\n", 2, "labels", "unknown parent")


def test_cp_unknown_child(tmp_path):
    bad(tmp_path, "c.txt", "坏\t认知歪曲,认知歪曲##放大\n", 1, "labels", "unknown child")


def test_cp_columns_and_empty_sentence(tmp_path):
    bad(tmp_path, "t.txt", "好\t驳斥\n没有标签这一列\n", 2, "columns", "malformed line", fmt="cp")
    bad(tmp_path, "s.txt", "  \t驳斥\n", 1, "sentence", "empty post", fmt="cp")


# ----------------------------------------------------------------------------- IMHI instruction


def q(post, question="Does the poster suffer from depression?"):
    return f'Consider this post: "{post}" Question: {question}'


YES = "Yes, the poster suffers from depression. Reasoning: sad."


def test_imhi_post_ends_at_last_question_marker(tmp_path):
    post = 'he said "hi" Question: why? and left'
    path = write(tmp_path, "dr.csv", imhi_csv([[q(post), YES]]))
    (r,) = load_records("dr", path)
    assert r["query"][r["post_start"] : r["post_end"]] == post and r["answer"] == YES and r["labels"] == ["yes"]


def test_imhi_multiline_post_line_numbers(tmp_path):
    rows = [[q("line one\nline two\nline three"), YES], [q("ok"), "Maybe. Reasoning: unsure."]]
    e = bad(tmp_path, "ml.csv", imhi_csv(rows), 5, "gpt-3.5-turbo", "no readable label", task="dr")
    assert "Maybe" not in e.detail and "characters, sha256" in e.detail  # an answer can restate the post


def test_imhi_aspect_from_question(tmp_path):
    rows = [
        [
            q("x y", "Does the post show risk of perceived burdensomeness?"),
            "No, the post does not show this risk. Reasoning: none.",
        ]
    ]
    (r,) = load_records("irf", write(tmp_path, "irf.csv", imhi_csv(rows)))
    assert r["aspect"] == "perceived burdensomeness" and r["labels"] == ["no"]


def test_imhi_unknown_aspect(tmp_path):
    rows = [
        [
            q("x y", "Does the financial wellness dimension exist in the post?"),
            "Yes, this wellness dimension exists in the post. Reasoning: r.",
        ]
    ]
    bad(tmp_path, "a.csv", imhi_csv(rows), 2, "query", "unknown aspect", task="multiwd")


def test_imhi_missing_column_and_empty_post(tmp_path):
    bad(
        tmp_path,
        "h.csv",
        imhi_csv([[q("x"), YES]], header=("query", "answer")),
        1,
        "gpt-3.5-turbo",
        "missing column",
        task="dr",
        fmt="imhi_instruction",
    )
    bad(tmp_path, "p.csv", imhi_csv([[q(" "), YES]]), 2, "query", "empty post", task="dr")


# ----------------------------------------------------------------------------- IMHI completion


def test_imhi_complete_with_index_column_and_aspect(tmp_path):
    header = ("", "post", "question", "response")
    rows = [
        [
            "0",
            "Post: I pray a lot.",
            ' Question: The answer to the question "Does the spiritual wellness dimension exists in the post?" is ',
            " yes. Reasoning: prayer.",
        ]
    ]
    (r,) = load_records("multiwd", write(tmp_path, "mw.csv", imhi_csv(rows, header)))
    t = TASKS["multiwd"]
    assert r["aspect"] == "spiritual" and r["labels"] == ["yes"] and r["id"] == "1"
    assert r["query"] == t.format_query("I pray a lot.", "spiritual")[0]
    assert r["answer"] == "Yes, this wellness dimension exists in the post. Reasoning: prayer."


def test_imhi_complete_unreadable_response(tmp_path):
    rows = [
        ["Post: a", " Question: This post shows the stress cause of ", "work. Reasoning: r"],
        ["Post: b", " Question: This post shows the stress cause of ", "dunno. Reasoning: r"],
    ]
    bad(tmp_path, "sad.csv", imhi_csv(rows, ("post", "question", "response")), 3, "response", task="sad")


def test_imhi_complete_empty_post(tmp_path):
    rows = [["Post: ", " Question: This post shows the stress cause of ", "work. Reasoning: r"]]
    bad(tmp_path, "sad.csv", imhi_csv(rows, ("post", "question", "response")), 2, "post", "empty post", task="sad")


# ----------------------------------------------------------------------------- alpaca / chat


SOS = TASKS["sos_hl_1k"]


def test_alpaca_input_span_default_id_and_task_argument(tmp_path):
    rows = [{"instruction": "判断风险。", "input": "想死", "output": "该帖子的发布者有高自杀风险。"}]
    (r,) = load_records("sos_hl_1k", write(tmp_path, "a.jsonl", "\n".join(json.dumps(x) for x in rows)))
    assert r["query"] == "判断风险。\n想死" and r["query"][r["post_start"] : r["post_end"]] == "想死"
    assert r["id"] == "1" and r["labels"] == ["高自杀风险"]


def test_alpaca_quoted_post_span(tmp_path):
    rows = [{"task": "sos_hl_1k", "instruction": SOS.format_query("好累")[0], "output": "低风险。"}]
    (r,) = load_records(None, write(tmp_path, "a.json", json.dumps(rows)))
    assert (r["post_start"], r["post_end"]) == SOS.format_query("好累")[1:]
    rows = [{"task": "sos_hl_1k", "instruction": "随便一句话", "output": "低风险。"}]
    (r,) = load_records(None, write(tmp_path, "b.json", json.dumps(rows)))
    assert (r["post_start"], r["post_end"]) == (-1, -1)


def test_alpaca_json_list_errors_name_their_line(tmp_path):
    rows = [
        {"task": "sos_hl_1k", "instruction": "a", "output": "高风险"},
        {"task": "sos_hl_1k", "instruction": "b", "output": "不知道"},
    ]
    text = json.dumps(rows, ensure_ascii=False, indent=1)
    line = text.split("\n").index(" {", 2) + 1  # where the second object starts
    bad(tmp_path, "al.json", text, line, "output", "no readable label")


def test_alpaca_unknown_task_and_missing_field(tmp_path):
    bad(
        tmp_path,
        "t.jsonl",
        json.dumps({"task": "nope", "instruction": "a", "output": "b"}) + "\n",
        1,
        "task",
        "unknown task",
    )
    bad(
        tmp_path,
        "o.jsonl",
        "\n" + json.dumps({"task": "sos_hl_1k", "instruction": "a"}) + "\n",
        2,
        "output",
        "missing column",
    )
    bad(tmp_path, "j.jsonl", '{"task": "sos_hl_1k",\n', 1, "json", "invalid JSON")


def test_alpaca_with_per_row_template_overrides(tmp_path):
    rows = [{"task": "sos_hl_1k", "instruction": "帖子：好累\n风险？", "output": "低风险"}]
    path = write(tmp_path, "t.jsonl", json.dumps(rows[0], ensure_ascii=False))
    (r,) = load_records(None, path, templates={"sos_hl_1k": {"query_template": "帖子：{post}\n风险？"}})
    assert r["query"][r["post_start"] : r["post_end"]] == "好累"


def test_chat_turns(tmp_path):
    row = {
        "task": "sos_hl_1k",
        "id": 9,
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": SOS.format_query("想死")[0]},
            {"role": "assistant", "content": "该帖子的发布者有高自杀风险。推理：x"},
        ],
    }
    (r,) = load_records(None, write(tmp_path, "c.jsonl", json.dumps(row, ensure_ascii=False)))
    assert r["id"] == "9" and r["labels"] == ["高自杀风险"] and r["answer"].endswith("推理：x")
    assert r["query"][r["post_start"] : r["post_end"]] == "想死"


def test_chat_without_assistant_turn(tmp_path):
    row = {"task": "sos_hl_1k", "messages": [{"role": "user", "content": "x"}]}
    bad(tmp_path, "c.jsonl", json.dumps(row), 1, "messages", "no assistant turn", fmt="chat")


def test_chat_duplicate_ids(tmp_path):
    row = {
        "task": "sos_hl_1k",
        "id": "a",
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "高风险"}],
    }
    bad(tmp_path, "d.jsonl", json.dumps(row) + "\n" + json.dumps(row) + "\n", 2, "id", "duplicate id")


# ----------------------------------------------------------------------------- Hub datasets


def test_hub_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(source, split):
        calls.append((source, split))
        return datasets.Dataset.from_list(
            [{"id": 1, "label": 1, "comment": "想死"}, {"id": 2, "label": 5, "comment": "好累"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(ValueError, match="fmt"):
        load_records(None, "someone/sos")  # no task, so no format to read it with
    with pytest.raises(DataError) as e:  # the task names its format (sos_llm): no fmt= needed
        load_records("sos_hl_1k", "someone/sos", hub_split="validation")
    with pytest.raises(DataError) as e:
        load_records("sos_hl_1k", "someone/sos", "sos_llm", hub_split="validation")
    assert "someone/sos" in str(e.value) and (e.value.line, e.value.field) == (2, "label")
    report = LoadReport()
    (r,) = load_records("sos_hl_1k", "someone/sos", "sos_llm", on_error="skip", report=report)
    assert r["labels"] == ["高自杀风险"] and report.total_skipped == 1
    assert calls[-1] == ("someone/sos", "train") and calls[0] == ("someone/sos", "validation")


# ----------------------------------------------------------------------------- skip mode


def test_skip_mode_counts_every_bad_item(tmp_path):
    text = SOS_HEAD + "1\t0\t好累\r\n2\t9\t想死\r\n3\t1\r\n4\t1\t \r\n5\t1\t想死\r\n5\t0\t失眠\r\n6\t0\t还行\r\n"
    path = write(tmp_path, "mixed.csv", text)
    report = LoadReport()
    records = load_records(None, path, on_error="skip", report=report)
    assert [r["id"] for r in records] == ["1", "5", "6"]
    f = str(path)
    assert report.skipped == {
        (f, "label outside the label set"): 1,
        (f, "malformed line"): 1,
        (f, "empty post"): 1,
        (f, "duplicate id"): 1,
    }
    assert report.total_skipped == 4 and report.loaded[f] == 3
    assert "mixed.csv" in report.summary() and "duplicate id" in report.summary()


def test_skip_mode_ids_do_not_shift(tmp_path):
    text = f"{LABELS}\t内容\n" + "1\t" + "0\t" * 11 + "好\n" + "x\t" * 12 + "坏\n" + "1\t" + "0\t" * 11 + "行\n"
    path = write(tmp_path, "s.tsv", text)
    report = LoadReport()
    assert [r["id"] for r in load_records(None, path, on_error="skip", report=report)] == ["1", "3"]
    assert report.total_skipped == 1


def test_skip_mode_undecodable_lines(tmp_path):
    path = tmp_path / "u.csv"
    path.write_bytes((SOS_HEAD + "1\t0\t好累\r\n").encode() + b"2\t1\t\xff\r\n" + "3\t1\t想死\r\n".encode())
    report = LoadReport()
    assert [r["id"] for r in load_records(None, path, on_error="skip", report=report)] == ["1", "3"]
    assert report.skipped[(str(path), "undecodable bytes")] == 1


def test_file_level_errors_raise_even_when_skipping(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        load_records(None, write(tmp_path, "e.csv", " \n"), "sos_llm", on_error="skip", report=LoadReport())


# ----------------------------------------------------------------------------- paths


def test_shared_data_dir_env_override(tmp_path, monkeypatch):
    from mentalglm.data import paths

    monkeypatch.setenv(paths.SHARED_DATA_ENV, str(tmp_path))
    assert paths.shared_data_dir() == tmp_path
    monkeypatch.setenv(paths.SHARED_DATA_ENV, str(tmp_path / "missing"))
    assert paths.shared_data_dir() is None
    assert (paths.FIXTURES_DIR / "make_fixtures.py").is_file()


def test_fixtures_are_what_the_generator_writes(tmp_path):
    from mentalglm.fixtures.make_fixtures import make

    make(tmp_path)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) == 36  # with the three expert-example files of build_data.py and C-IMHI's three splits
    for rel in written:
        assert (tmp_path / rel).read_bytes() == (F / rel).read_bytes(), rel


def test_csv_fields_are_read_exactly_as_the_csv_module_reads_them(tmp_path):
    # Quoted line breaks (LF and CRLF) stay in the field; CR-only line ends still end rows.
    answer = "Yes, the poster suffers from depression. Reasoning: first line\nsecond line\r\nthird."
    path = write(tmp_path, "dr.csv", imhi_csv([[q("a post\nover two lines"), answer], [q("ok"), YES]]))
    with open(path, newline="", encoding="utf-8") as f:
        expected = list(csv.reader(f))[1:]
    records = load_records("dr", path)
    assert [[r["query"], r["answer"]] for r in records] == expected
    cr = write(tmp_path, "cr.csv", SOS_HEAD.replace("\r\n", "\r") + "1\t0\t好累\r2\t1\t想死\r")
    assert [r["id"] for r in load_records(None, cr)] == ["1", "2"]


def test_a_post_of_only_invisible_characters_is_empty(tmp_path):
    bad(tmp_path, "zw.csv", SOS_HEAD + "1\t0\t\u200b\u200b\ufeff\r\n", 2, "comment", "empty post")


SOCIALCD_ROW = "\t".join(["1"] + ["0"] * 11)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize(
    "name, text, encoding",
    [
        ("lone_cr.csv", SOS_HEAD + "1\t0\t前半\r后半\r\n2\t1\t想死\r\n", "utf-8"),  # SOS-HL-1K LLM form
        ("lone_cr.tsv", "0\t1\t前半\r后半\r\n1\t0\t想死\r\n", "gbk"),  # SOS-HL-1K BERT form
        ("socialcd_lone_cr.tsv", f"{LABELS}\t内容\n{SOCIALCD_ROW}\t前半\r后半\n", "utf-8"),
    ],
)
def test_a_lone_cr_inside_a_post_keeps_the_post_whole(tmp_path, name, text, encoding, on_error):
    """A file of LF or CRLF lines: a lone CR inside a post is part of it (was: the post cut there, the rest
    skipped as a malformed line, silently with on_error=skip)."""
    report = LoadReport()
    records = load_records(None, write(tmp_path, name, text, encoding), on_error=on_error, report=report)
    assert "前半\r后半" in records[0]["query"] and records[0]["id"] == "1"
    assert not report.skipped
    # a file whose lines end in CR alone is still read line by line
    cr_lines = SOS_HEAD.replace("\r\n", "\r") + "1\t0\t好\r2\t1\t累\r"
    assert len(load_records(None, write(tmp_path, "cr.csv", cr_lines))) == 2
