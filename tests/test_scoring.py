import json
from pathlib import Path

import pytest

from mentalglm.fileio.atomic import append_jsonl, write_atomic, write_json_atomic
from mentalglm.reporting.results import results_markdown, save_plots
from mentalglm.reporting.writer import score_predictions_file
from mentalglm.scoring.metrics import mean_f1, result_keys
from mentalglm.scoring.score import PredictionsError, score_records

FIXTURE = Path(__file__).parent / "fixtures" / "predictions_small.jsonl"

# Hand-computed from the fixture (see the comments on each task).
EXPECTED = {
    # tp 1 (sos-1), fn 1 (sos-2 unparsed), fp 1 (sos-3 "高风险"), tn 1
    "sos_hl_1k": dict(precision=1 / 2, recall=1 / 2, f1=1 / 2, parse_rate=3 / 4, n=4, accuracy=1 / 2),
    # cd-1 tp 2; cd-2 tp 1 (放大和缩小 -> 放大) + fp 1 (应该式); cd-3 unparsed: fn 1
    "socialcd_3k": dict(precision=3 / 4, recall=3 / 4, f1=3 / 4, parse_rate=2 / 3, n=3),
    # parents: cp-1 tp 2; cp-2 gold {触发性事件}, pred {触发性事件, 情绪反应}: tp 1 fp 1
    "cp_parent": dict(precision=3 / 4, recall=1.0, f1=6 / 7, parse_rate=1.0, n=2),
    # children: cp-1 tp 1 (放大和缩小), fp 1 (行为效应), fn 1 (情感效应); cp-2 fp 1 (情感效应), fn 1 (情感)
    "cp_child": dict(precision=1 / 3, recall=1 / 3, f1=1 / 3, parse_rate=1.0, n=2),
    # positive "yes": dr-1 tp, dr-2 tn, dr-3 unparsed with gold yes: fn
    "dr": dict(
        precision=1.0,
        recall=1 / 2,
        f1=2 / 3,
        parse_rate=2 / 3,
        n=3,
        accuracy=2 / 3,
        f1_weighted=(1 * 1.0 + 2 * (2 / 3)) / 3,
    ),
    # sad-1 gold social relationships, pred work; sad-2 school correct. Weighted over gold support.
    "sad": dict(precision=1 / 2, recall=1 / 2, f1=1 / 2, parse_rate=1.0, n=2, accuracy=1 / 2, f1_weighted=1 / 2),
    # mwd-1 tp (social), mwd-2 fp (physical)
    "multiwd": dict(
        precision=1 / 2,
        recall=1.0,
        f1=2 / 3,
        parse_rate=1.0,
        n=2,
        accuracy=1 / 2,
        f1_weighted=1 / 3,
        per_aspect={"physical": 0.0, "social": 1.0},
    ),
}


def check_expected(metrics):
    assert result_keys(metrics) == list(EXPECTED)  # in the order the file names its tasks
    for key, expected in EXPECTED.items():
        for name, value in expected.items():
            assert metrics[key][name] == pytest.approx(value, abs=1e-12), (key, name)


def test_score_predictions_file(tmp_path):
    metrics = score_predictions_file(FIXTURE, tmp_path / "out")
    check_expected(metrics)
    assert mean_f1(metrics) == pytest.approx((1 / 2 + 3 / 4 + 6 / 7 + 1 / 3 + 2 / 3 + 1 / 2 + 2 / 3) / 7)

    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    check_expected(on_disk)
    for key in result_keys(on_disk):
        assert {"precision", "recall", "f1", "parse_rate", "n"} <= set(on_disk[key])
    assert on_disk["schema_version"] == 1 and on_disk["templates"] == {}
    assert on_disk["tasks"]["cp"]["metric_keys"] == ["cp_parent", "cp_child"]

    scored = [json.loads(line) for line in (tmp_path / "out" / "scored.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(scored) == 16
    by_id = {r["id"]: r for r in scored}
    assert by_id["sos-2"]["parsed"] is False and by_id["sos-2"]["pred_labels"] == []
    assert by_id["sos-3"]["pred_labels"] == ["高自杀风险"]
    assert by_id["cd-2"]["gold_labels"] == ["放大"] and by_id["cd-2"]["pred_labels"] == ["放大", "应该式"]
    assert by_id["cp-2"]["pred_labels"] == ["触发性事件", "情绪反应-情感效应"]
    assert by_id["dr-2"]["gold_labels"] == ["no"] and by_id["dr-2"]["reference"].startswith("No,")
    assert by_id["mwd-1"]["aspect"] == "social"

    md = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert "| SOS-HL-1K | 50.00 | 50.00 | 50.00 | 75.00 | 4 |" in md
    assert "| CP (parent) | 75.00 | 100.00 | 85.71 | 100.00 | 2 |" in md
    assert "| DR | 66.67 | 77.78 | 66.67 | 3 |" in md  # IMHI table: accuracy, weighted F1
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp files left behind


def test_score_records_in_memory():
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    scored, metrics = score_records(rows)
    check_expected(metrics)
    assert [r["id"] for r in scored] == [r["id"] for r in rows]
    assert "pred_labels" not in rows[0]  # input rows are not modified


def test_results_markdown_shapes():
    assert "No predictions" in results_markdown({})
    # 10 items: 4 low-risk posts answered low, 2 unparsed; 4 high-risk posts answered high
    confusion = {"confusion": [[4, 0, 2], [0, 4, 0]], "confusion_labels": ["低自杀风险", "高自杀风险", "unparsed"]}
    sos = dict(precision=1.0, recall=1.0, f1=1.0, parse_rate=0.8, n=10, accuracy=0.8, **confusion)
    md = results_markdown({"sos_hl_1k": sos}, title="T")
    assert md.startswith("# T")
    assert "| SOS-HL-1K | 100.00 | 100.00 | 100.00 | 80.00 | 10 |" in md
    # F1 of the high-risk class hides the unparsed low-risk answers; accuracy and the counts show them
    assert "## Accuracy and weighted F1" in md and "| SOS-HL-1K | 80.00 | 80.00 | 10 |" in md
    assert "| Task | Gold | low risk | high risk | unparsed |" in md
    assert "| SOS-HL-1K | low risk | 4 | 0 | 2 |" in md and "| SOS-HL-1K | high risk | 0 | 4 | 0 |" in md
    assert results_markdown({"sos_hl_1k": sos, "f1_mean": 1.0}, title="T") == md  # summary entries are skipped


def test_save_plots(tmp_path, recwarn):
    metrics = score_predictions_file(FIXTURE, tmp_path)
    paths = save_plots({k: metrics[k] for k in result_keys(metrics)}, tmp_path / "plots")
    names = {p.name for p in paths}
    assert "cp_child_per_label_f1.png" in names and "sos_hl_1k_confusion.png" in names
    assert "socialcd_3k_confusion.png" not in names  # multi-label: no confusion matrix
    assert len(paths) == 7 + 4  # a bar chart per key, a confusion matrix per single-label task
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert not [w for w in recwarn if "lyph" in str(w.message)]


def test_atomic_helpers(tmp_path):
    write_atomic(tmp_path / "a" / "x.txt", "一")
    assert (tmp_path / "a" / "x.txt").read_text(encoding="utf-8") == "一"
    write_json_atomic(tmp_path / "x.json", {"k": "值"})
    assert json.loads((tmp_path / "x.json").read_text(encoding="utf-8")) == {"k": "值"}
    append_jsonl(tmp_path / "y.jsonl", {"a": 1})
    append_jsonl(tmp_path / "y.jsonl", [{"a": 2}, {"a": 3}])
    assert [json.loads(x)["a"] for x in (tmp_path / "y.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "x.json", "y.jsonl"]


# ----------------------------------------------------------------------------- bad input

GOOD = {"task": "dr", "labels": ["yes"], "output": "Yes."}


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"task": "dr", "output": ', "bad JSON"),
        ('["not", "an", "object"]', "JSON object"),
        (json.dumps({"labels": ["yes"], "output": "Yes."}), "'task'"),
        (json.dumps({"task": "depression", "labels": ["yes"], "output": "Yes."}), "'task'"),
        (json.dumps({"task": "dr", "labels": ["yes"]}), "'output'"),
        (json.dumps({"task": "dr", "labels": ["yes"], "output": None}), "'output'"),
        (json.dumps({"task": "dr", "labels": ["yes"], "output": 3}), "'output'"),
        (json.dumps({"task": "dr", "output": "Yes."}), "'reference'"),
        (json.dumps({"task": "dr", "labels": ["maybe"], "output": "Yes."}), "'labels'"),
        (json.dumps({"task": "dr", "labels": "yes", "output": "Yes."}), "'labels'"),
        (json.dumps({"task": "dr", "labels": ["yes", "no"], "output": "Yes."}), "'labels'"),
        (json.dumps({"task": "socialcd_3k", "labels": ["妄下结论"], "output": "无"}), "'labels'"),
        (json.dumps({"task": "cp", "labels": ["放大和缩小"], "output": "无"}), "'labels'"),
        (json.dumps({"task": "dr", "reference": "maybe", "output": "Yes."}), "'reference'"),
        (json.dumps({"task": "dr", "reference": 1, "output": "Yes."}), "'reference'"),
        (json.dumps({"task": "irf", "aspect": "social", "labels": ["yes"], "output": "Yes."}), "'aspect'"),
    ],
)
def test_bad_input_names_file_line_field(tmp_path, line, field):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(PredictionsError) as err:
        score_predictions_file(path, tmp_path / "out")
    message = str(err.value)
    assert f"{path}:2" in message and field in message, message
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_bad_record_in_memory_names_row():
    with pytest.raises(PredictionsError, match=r"rows: row 2: .*'output'"):
        score_records([GOOD, {"task": "dr", "labels": ["yes"]}])


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n\n" + json.dumps({"task": "x", "output": ""}) + "\n")
    with pytest.raises(PredictionsError, match=r"p.jsonl:4: field 'task'"):
        score_predictions_file(path, tmp_path / "out")


REASONING_FIRST = "**推理**：帖子里只是在抱怨工作，没有计划，也不是高自杀风险。\n**结论**：低自杀风险"


def test_free_form_rows_are_read_the_way_they_are_marked(tmp_path):
    rows = [
        {"task": "sos_hl_1k", "id": "marked", "labels": ["低自杀风险"], "output": REASONING_FIRST, "parser": "free"},
        {"task": "sos_hl_1k", "id": "plain", "labels": ["低自杀风险"], "output": REASONING_FIRST},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    metrics = score_predictions_file(path, tmp_path / "out")
    scored = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "scored.jsonl").read_text().splitlines())}
    assert scored["marked"]["pred_labels"] == ["低自杀风险"] and scored["marked"]["parser"] == "free"
    assert scored["plain"]["parsed"] is False and scored["plain"]["parser"] == "strict"
    assert metrics["sos_hl_1k"]["parse_rate"] == 0.5
    # parser_mode= (evaluate.py's setting) reads every row one way
    metrics = score_predictions_file(path, tmp_path / "free", parser_mode="free")
    assert metrics["sos_hl_1k"]["parse_rate"] == 1.0 and metrics["sos_hl_1k"]["accuracy"] == 1.0


def test_a_row_with_an_unknown_parser_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    row = {"task": "sos_hl_1k", "id": "1", "labels": ["低自杀风险"], "output": "低自杀风险", "parser": "loose"}
    path.write_text("\n" + json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(PredictionsError, match=r"p\.jsonl:2: field 'parser': 'loose' is not one of strict, free"):
        score_predictions_file(path, tmp_path / "out")


def test_chart_labels_are_names_a_reader_can_read(monkeypatch):
    from mentalglm.reporting import results
    from mentalglm.tasks import TASKS

    labels = list(TASKS["socialcd_3k"].labels)
    monkeypatch.setattr(results, "cjk_font", lambda: None)  # no CJK font: the paper's English names
    names, font = results._tick_labels(labels, TASKS["socialcd_3k"])
    assert names[:2] == ["all-or-nothing", "overgeneralization"] and font == {} and all(n.isascii() for n in names)
    monkeypatch.setattr(results, "cjk_font", lambda: "Noto Sans CJK SC")  # a CJK font: the labels themselves
    assert results._tick_labels(labels, TASKS["socialcd_3k"]) == (labels, {"fontfamily": "Noto Sans CJK SC"})


def test_rows_say_how_they_were_read_and_results_count_it():
    from mentalglm.scoring.score import score
    from mentalglm.tasks import TASKS

    sos = TASKS["sos_hl_1k"]
    outputs = [
        "该帖子的发布者有高自杀风险。推理：帖子写道不想活了。",
        "发布者并没有高自杀风险。",
        "A. 低自杀风险 B. 高自杀风险 推理：帖子提到告别。正确答案：B",
        "A. 低自杀风险 B. 高自杀风险 推理：帖子提到告别。",
        "我无法判断。",
    ]
    rows = [{"task": "sos_hl_1k", "output": o, "gold_labels": ["高自杀风险"]} for o in outputs]
    scored, metrics = score(rows, {"sos_hl_1k": sos})
    assert [r["labelled_by"] for r in scored] == ["stated", "negation", "choice", "none", "none"]
    assert [r.get("reason") for r in scored] == [None, None, None, "options without a choice", "no label found"]
    assert metrics["sos_hl_1k"]["read_by"] == {
        "choice": 1,
        "negation": 1,
        "stated": 1,
        "unparsed: no label found": 1,
        "unparsed: options without a choice": 1,
    }
    text = results_markdown(metrics, {"sos_hl_1k": sos})
    assert "## How the answers were read" in text
    header = "| Task | stated | choice | negation | unparsed: no label found | unparsed: options without a choice |"
    assert header in text
