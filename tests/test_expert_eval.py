"""The expert-evaluation kit (expert_eval.py): sampling, blind sheets, the ratings read back, agreement."""

from __future__ import annotations

import ast
import csv
import io
import json
from pathlib import Path

import pytest

from mentalglm.errors import ConfigError
from mentalglm.expert import kit

DIMS = [kit.Dimension("consistency", "", 0, 3), kit.Dimension("reliability", "", 0, 3)]


def test_stratified_counts_follow_the_split_sizes_and_the_papers_own_split_needs_per_task():
    # C-IMHI's test sizes (250 / 682 / 945): proportional largest-remainder rounding gives 13 / 36 / 51; the
    # paper's 14 / 36 / 50 is not proportional to them, so conf/expert_eval.yaml reproduces it with per_task.
    assert kit.stratified_counts({"sos_hl_1k": 250, "socialcd_3k": 682, "cp": 945}, 100) == {
        "sos_hl_1k": 13,
        "socialcd_3k": 36,
        "cp": 51,
    }
    assert kit.stratified_counts({"a": 1, "b": 1, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}
    with pytest.raises(ConfigError, match="holds only 3 items"):
        kit.stratified_counts({"a": 1, "b": 2}, 4)


def test_quadratic_kappa_and_krippendorffs_alpha_match_known_values():
    assert kit.quadratic_kappa([0, 1, 2, 3], [0, 1, 2, 3], 0, 3) == pytest.approx(1.0)
    assert kit.quadratic_kappa([0, 1, 2, 3], [3, 2, 1, 0], 0, 3) == pytest.approx(-1.0)  # by hand: 1 - (20/9)/(10/9)
    assert kit.quadratic_kappa([0, 0, 1, 1], [0, 1, 0, 1], 0, 3) == pytest.approx(0.0)  # observed = chance
    assert kit.quadratic_kappa([2, 2, 2], [2, 2, 2], 0, 3) is None  # undefined without any variation
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 3 coders, 15 units, missing values.
    a = [None, None, None, None, None, 3, 4, 1, 2, 1, 1, 3, 3, None, 3]
    b = [1, None, 2, 1, 3, 3, 4, 3, None, None, None, None, None, None, None]
    c = [None, None, 2, 1, 3, 4, 4, None, 2, 1, 1, 3, 3, None, 4]
    assert kit.krippendorff_alpha([a, b, c], "nominal") == pytest.approx(0.691, abs=5e-4)
    assert kit.krippendorff_alpha([a, b, c], "interval") == pytest.approx(0.811, abs=5e-4)


def _sheet(tmp_path: Path, rows: list[dict], name: str = "rater_1.csv") -> Path:
    path = tmp_path / name
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=kit.sheet_fields(DIMS), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows({"task": "dr", "aspect": "", "post": "p", "answer": "a", "comment": ""} | r for r in rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"code": "x1", "consistency": "3", "reliability": "4"}, {"code": "x2"}],
            "row 2: reliability='4' is not a whole",
        ),
        ([{"code": "x1", "consistency": "2.5", "reliability": "1"}], "row 2: consistency='2.5' is not a whole"),
        ([{"code": "x1", "consistency": "", "reliability": "1"}], "row 2: consistency is empty"),
        ([{"code": "x1", "consistency": "1", "reliability": "1"}] * 2, "row 3: code 'x1' repeats row 2"),
        ([{"code": "x9", "consistency": "1", "reliability": "1"}], "row 2: code 'x9' is not in the key"),
        ([{"code": "x1", "consistency": "1", "reliability": "1"}], "1 coded answers of the key are missing"),
    ],
)
def test_a_filled_sheet_with_a_bad_row_is_an_error_naming_the_file_and_row(tmp_path, rows, message):
    key = {"x1": {}, "x2": {}}
    path = _sheet(tmp_path, rows)
    with pytest.raises(ConfigError, match=message) as e:
        kit.read_sheet(path, key, DIMS)
    assert str(path) in str(e.value)


def test_a_sheet_without_a_rubric_column_is_an_error(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("code,consistency\r\nx1,1\r\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no column 'reliability'"):
        kit.read_sheet(path, {"x1": {}}, DIMS)


def _predictions(tmp_path: Path) -> dict[str, Path]:
    """Two models' answers to the fixtures' SOS-HL-1K and CP test items (model b's explanations are worse)."""
    from mentalglm.data.paths import FIXTURES_DIR
    from mentalglm.data.splits import build_splits

    specs = {
        "sos_hl_1k": {
            "train": FIXTURES_DIR / "sos_hl_1k/suicide_train_LLM.csv",
            "val_size": 30,
            "test": FIXTURES_DIR / "sos_hl_1k/suicide_val_LLM.csv",
        },
        "cp": {
            "train": FIXTURES_DIR / "cp/train.txt",
            "val": FIXTURES_DIR / "cp/val.txt",
            "test": FIXTURES_DIR / "cp/test.txt",
        },
    }
    test = build_splits(specs, seed=42)["test"]
    files = {}
    for model, prefix in (("mentalglm_chat", "推理：帖子提到"), ("glm4_chat", "推理：不确定")):
        rows = [{"task": r["task"], "id": r["id"], "output": f"{r['answer']} {prefix}"} for r in test]
        files[model] = tmp_path / f"{model}.jsonl"
        files[model].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return files


def fill(sheet: Path, key: dict[str, dict], score) -> None:
    """A rater's filled sheet: `score(model, code)` -> {dimension: rating}."""
    fields, rows = kit.read_csv_rows(sheet)
    for r in rows:
        r.update({k: str(v) for k, v in score(key[r["code"]]["model"], r["code"]).items()})
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=fields, lineterminator="\r\n").writeheader()
    csv.DictWriter(buf, fieldnames=fields, lineterminator="\r\n").writerows(rows)
    sheet.write_text(buf.getvalue(), encoding="utf-8-sig")


PAPER_RUBRIC = ["consistency", "reliability", "professionality"]


@pytest.mark.slow
def test_sample_blind_rate_and_aggregate_end_to_end(run_cli, tmp_path):
    files = _predictions(tmp_path)
    models = [f"+predictions.{m}={p}" for m, p in files.items()]
    run = tmp_path / "sample"
    args = ["expert_eval.py", "data=fixtures", "data.select=[sos_hl_1k,cp]", "size=10", *models]
    run_cli(*args, f"output_dir={run}")
    manifest = json.loads((run / "sample.json").read_text())
    assert manifest["per_task"] == {"sos_hl_1k": 5, "cp": 5} and manifest["answers"] == 20
    key = kit.read_key(run / "key.csv")
    assert len(key) == 20 and {r["model"] for r in key.values()} == set(files)
    sheets = {p.stem: p.read_text(encoding="utf-8-sig") for p in sorted((run / "sheets").glob("*.csv"))}
    assert set(sheets) == {"rater_1", "rater_2"}
    for text in sheets.values():  # blind: codes, never a model name
        assert "mentalglm_chat" not in text and "glm4_chat" not in text and "model" not in text.splitlines()[0]
    order = {r: [row["code"] for row in csv.DictReader(io.StringIO(t))] for r, t in sheets.items()}
    assert sorted(order["rater_1"]) == sorted(order["rater_2"]) and order["rater_1"] != order["rater_2"]
    assert "**consistency** (0-3)" in (run / "rubric.md").read_text()
    again = tmp_path / "again"
    run_cli(*args, f"output_dir={again}")  # seeded: the same sample, codes and order
    assert (again / "key.csv").read_bytes() == (run / "key.csv").read_bytes()

    def good(model, code):
        return {d: 3 if model == "mentalglm_chat" else 1 for d in PAPER_RUBRIC}

    def noisy(model, code):
        base = good(model, code)
        return base | {"professionality": 2} if code < "8" else base

    fill(run / "sheets/rater_1.csv", key, good)
    fill(run / "sheets/rater_2.csv", key, noisy)
    out = tmp_path / "agg"
    run_cli("expert_eval.py", "action=aggregate", "data=fixtures", f"run_dir={run}", f"output_dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"]["mentalglm_chat"]["consistency"]["mean"] == 3.0
    assert metrics["models"]["glm4_chat"]["reliability"] == {"mean": 1.0, "median": 1.0, "std": 0.0, "n": 20}
    mine = metrics["models"]["mentalglm_chat"]
    assert mine["professionality"]["mean"] < 3 and mine["overall"]["mean"] == pytest.approx(
        sum(mine[d]["mean"] for d in PAPER_RUBRIC) / 3
    )
    agreement = metrics["agreement"]
    assert agreement["consistency"]["kappa_quadratic"] == pytest.approx(1.0) and agreement["consistency"][
        "alpha"
    ] == pytest.approx(1.0)
    assert agreement["professionality"]["alpha"] < 1.0
    assert set(metrics["tasks"]["glm4_chat"]) == {"sos_hl_1k", "cp"}
    results = (out / "results.md").read_text()
    assert "Inter-rater agreement" in results and "| mentalglm_chat |" in results and "not diagnoses" in results
    assert (out / "box_plots.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "ratings.csv").read_text().splitlines()) == 41  # header + 2 raters x 20, unblinded

    # An edited code: one line naming the sheet and row; nothing written.
    text = (run / "sheets/rater_2.csv").read_text(encoding="utf-8-sig")
    first = text.splitlines()[1].split(",")[0]
    (run / "sheets/rater_2.csv").write_text(text.replace(first, "zzzzzz", 1), encoding="utf-8")
    bad = tmp_path / "bad"
    proc = run_cli(
        "expert_eval.py", "action=aggregate", "data=fixtures", f"run_dir={run}", f"output_dir={bad}", check=False
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "rater_2.csv: row 2: code 'zzzzzz' is not in the key" in last
    assert not (bad / "results.md").exists()
    for extra, message in (
        (["size=1000"], "size=1000, but the split holds only 60 items"),
        (["+per_task.dr=3"], "per_task names ['dr'], which no predictions file answers"),
        (["raters=[a,a]"], "raters must be distinct names"),
        (["raters=[r1,../../escape]"], "raters: '../../escape' is not a plain name"),
        (["action=judge"], "action='judge' is not one of sample, rate, aggregate"),
    ):
        proc = run_cli(*args, f"output_dir={bad}", *extra, check=False)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]
    assert not (bad / "key.csv").exists()


def test_a_predictions_file_with_a_bad_row_is_an_error_naming_the_line(tmp_path):
    from mentalglm.tasks import TASKS

    path = tmp_path / "p.jsonl"
    for text, message in (
        ('{"task": "dr", "id": 1, "output": "x"}\n{"task": "dr", "output": "y"}\n', ":2: field 'id' is missing"),
        ('{"task": "nosuch", "id": 1, "output": "x"}\n', ":1: field 'task' is 'nosuch'"),
        ('{"task": "dr", "id": 1}\n', ":1: field 'output'"),
        (
            '{"task": "dr", "id": 1, "output": "x"}\n{"task": "dr", "id": 1, "output": "x"}\n',
            ":2: task dr item '1' is answered twice",
        ),
        ("{not json\n", ":1: bad JSON"),
    ):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            kit.read_answers(path, TASKS)


def _interval_alpha(matrix: list[list[int]]) -> float:
    """Krippendorff's interval alpha written out for complete data: 1 - observed / expected squared difference."""
    units = list(zip(*matrix))
    values = [v for u in units for v in u]
    n = len(values)
    observed = sum(sum((a - b) ** 2 for a in u for b in u) / (len(u) - 1) for u in units) / n
    expected = sum((a - b) ** 2 for a in values for b in values) / (n * (n - 1))
    return 1 - observed / expected


@pytest.mark.real_data
def test_mentallamas_three_annotator_ratings_imported_as_sheets(run_cli, tmp_path):
    """MentaLLaMA's human evaluation of ChatGPT's DR explanations (121 answers, 3 annotators, 4 dimensions), turned
    into one sheet per annotator and a key, read back by action=aggregate: agreement per dimension."""
    from mentalglm.data.paths import shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("needs ../shared/data")
    source = shared_data_dir() / "imhi/human_evaluation/DR_annotation/chatgpt_data.csv"
    rows = list(csv.DictReader(io.StringIO(source.read_text(encoding="utf-8-sig"))))
    dims = ["fluency", "completeness", "reliability", "overall"]
    run = tmp_path / "dr"
    (run / "sheets").mkdir(parents=True)
    key = [
        {"code": f"c{i:03d}", "model": "chatgpt", "task": "dr", "id": str(i), "aspect": ""} for i in range(len(rows))
    ]
    (run / "key.csv").write_text(
        "code,model,task,id,aspect\r\n" + "".join(f"{k['code']},chatgpt,dr,{k['id']},\r\n" for k in key),
        encoding="utf-8",
    )
    ratings = {d: [ast.literal_eval(r[d]) for r in rows] for d in dims}
    for a in range(3):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\r\n")
        writer.writerow(["code", "task", "aspect", "post", "answer", *dims, "comment"])
        for i, r in enumerate(rows):
            writer.writerow(
                [key[i]["code"], "dr", "", r["text"], r["gpt-3.5-turbo"], *(ratings[d][i][a] for d in dims), ""]
            )
        (run / "sheets" / f"annotator_{a + 1}.csv").write_text(buf.getvalue(), encoding="utf-8")
    rubric = [f"+rubric.{d}={{min: 0, max: 3, description: {d}}}" for d in dims]
    out = tmp_path / "agg"
    run_cli(
        "expert_eval.py",
        "action=aggregate",
        "data=fixtures",
        f"run_dir={run}",
        "~rubric",
        *rubric,
        "overall_of=[]",
        "agreement_level=interval",
        f"output_dir={out}",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for d in dims:
        matrix = [[ratings[d][i][a] for i in range(len(rows))] for a in range(3)]
        assert metrics["agreement"][d]["alpha"] == pytest.approx(_interval_alpha(matrix), abs=1e-9)
        assert metrics["agreement"][d]["raters"] == 3 and metrics["agreement"][d]["items"] == len(rows) == 121
        mean = sum(map(sum, matrix)) / (3 * len(rows))
        assert metrics["models"]["chatgpt"][d]["mean"] == pytest.approx(mean)
    # The README's figures (ordinal alpha): near zero where almost every rating is 3.
    ordinal = {
        d: kit.krippendorff_alpha([[ratings[d][i][a] for i in range(len(rows))] for a in range(3)]) for d in dims
    }
    assert {d: round(v, 3) for d, v in ordinal.items()} == {
        "fluency": -0.017,
        "completeness": 0.121,
        "reliability": 0.039,
        "overall": 0.075,
    }


def rating_server(run: Path, rater: str, tmp: Path):
    """expert_eval.py action=rate as a real process on a free loopback port."""
    from serving import ServerProcess

    def args(port: int) -> list[str]:
        return ["action=rate", "data=fixtures", f"run_dir={run}", f"rater={rater}", f"port={port}"]

    return ServerProcess("expert_eval.py", args, tmp, timeout=120)


def chromium_and_playwright():
    """(Debian's Chromium, playwright's sync API), or the test is skipped."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return chromium, pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def rating_sample(run_cli, tmp_path: Path) -> Path:
    """A sample of 6 answers to rate (expert_eval.py action=sample on two models' predictions)."""
    run = tmp_path / "sample"
    models = [f"+predictions.{m}={p}" for m, p in _predictions(tmp_path).items()]
    run_cli("expert_eval.py", "data=fixtures", "data.select=[sos_hl_1k,cp]", "size=3", *models, f"output_dir={run}")
    return run


@pytest.mark.slow
@pytest.mark.browser
def test_the_rating_page_keeps_progress_across_a_closed_browser_and_a_restart_and_exports_the_sheet(run_cli, tmp_path):
    import httpx
    from test_demo_page import ARGS

    chromium, sync_api = chromium_and_playwright()
    run = rating_sample(run_cli, tmp_path)
    key = kit.read_key(run / "key.csv")
    server = rating_server(run, "rater_1", tmp_path)
    try:
        sheet = httpx.get(server.url + "/api/sheet").json()
        codes = [it["code"] for it in sheet["items"]]
        assert len(codes) == 6 and "not diagnoses" in sheet["notice"]
        assert "mentalglm_chat" not in json.dumps(sheet)  # the page knows codes, not models
        # bad ratings over HTTP: refused, nothing stored
        auth = {"X-Rating-Token": sheet["token"]}

        def put(code, body):
            return httpx.put(f"{server.url}/api/ratings/{code}", json={"version": 0} | body, headers=auth)

        assert put(codes[0], {"consistency": 4}).status_code == 422
        assert put(codes[0], {"consistency": True}).status_code == 422
        assert put("nosuch", {"consistency": 1}).status_code == 404
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('position').textContent.includes('1 of 6')")
            assert "0 of 6 rated" in page.inner_text("#progress") and page.inner_text("#post").strip()
            for dim, value in (("consistency", 3), ("reliability", 2), ("professionality", 1)):
                page.check(f"#{dim}-{value}")
            page.fill("#comment", "清楚")
            page.click("#next")
            page.wait_for_function("document.getElementById('progress').textContent.includes('1 of 6 rated')")
            page.close()  # the rater closes the browser ...
            page = browser.new_page()
            page.goto(server.url + "/")  # ... and comes back: the page resumes at the first unrated answer
            page.wait_for_function("document.getElementById('position').textContent.includes('2 of 6')")
            assert "1 of 6 rated" in page.inner_text("#progress")
            page.click("#prev")
            page.wait_for_function("document.getElementById('position').textContent.includes('1 of 6')")
            assert page.is_checked("#consistency-3") and page.is_checked("#professionality-1")
            assert page.input_value("#comment") == "清楚"
            browser.close()
        server.stop()
        server = rating_server(run, "rater_1", tmp_path)  # a restarted server reads the same SQLite file
        sheet = httpx.get(server.url + "/api/sheet").json()
        assert sheet["ratings"][codes[0]]["reliability"] == 2
        for code in codes[1:]:
            r = httpx.put(
                f"{server.url}/api/ratings/{code}",
                json={
                    "consistency": 2,
                    "reliability": 2,
                    "professionality": 2,
                    "version": sheet["versions"].get(code, 0),
                },
                headers={"X-Rating-Token": sheet["token"]},
            )
            assert r.status_code == 200, r.text
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
            page = browser.new_page(accept_downloads=True)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('progress').textContent.includes('6 of 6 rated')")
            with page.expect_download() as download:
                page.click("#export")
            assert download.value.suggested_filename == "rater_1.csv"
            page.wait_for_function("document.getElementById('status').textContent.includes('exported 6 of 6')")
            browser.close()
    finally:
        server.stop()
    dims = kit.rubric_dimensions({d: {"min": 0, "max": 3} for d in PAPER_RUBRIC})
    ratings = kit.read_sheet(run / "sheets/rater_1.csv", key, dims)  # the exported sheet is the aggregate's input
    assert ratings[codes[0]] == {"consistency": 3, "reliability": 2, "professionality": 1}
    assert "清楚" in (run / "sheets/rater_1.csv").read_text(encoding="utf-8-sig")


@pytest.mark.slow
@pytest.mark.browser
def test_the_rating_page_refuses_stale_tabs_other_sites_and_shows_a_locked_database(run_cli, tmp_path):
    """A stale tab's save is a conflict the page shows (the stored ratings stay); a save without a rating keeps the
    stored ones; a request naming another Host, another Origin or no session token changes nothing; a locked
    database is a message on the page."""
    import sqlite3

    import httpx
    from test_demo_page import ARGS

    chromium, sync_api = chromium_and_playwright()
    run = rating_sample(run_cli, tmp_path)
    server = rating_server(run, "rater_1", tmp_path)
    try:
        sheet = httpx.get(server.url + "/api/sheet").json()
        code, token = sheet["items"][0]["code"], sheet["token"]
        url = f"{server.url}/api/ratings/{code}"
        # DNS rebinding: another name for this machine gets nothing
        assert httpx.get(server.url + "/api/sheet", headers={"Host": "attacker.invalid"}).status_code == 421
        # changes without this page's token, or from another page, are refused
        rating = {"consistency": 1, "reliability": 1, "professionality": 1, "version": 0}
        assert httpx.put(url, json=rating).status_code == 403
        other = {"X-Rating-Token": token, "Origin": "http://attacker.invalid"}
        assert httpx.put(url, json=rating, headers=other).status_code == 403
        before = (run / "sheets/rater_1.csv").read_bytes()
        assert httpx.post(server.url + "/api/export").status_code == 403
        assert (run / "sheets/rater_1.csv").read_bytes() == before
        assert code not in httpx.get(server.url + "/api/sheet").json()["ratings"]

        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
            stale, fresh = browser.new_page(), browser.new_page()
            for page in (stale, fresh):
                page.goto(server.url + "/")
                page.wait_for_function("document.getElementById('position').textContent.includes('1 of 6')")
            for dim, value in (("consistency", 3), ("reliability", 2), ("professionality", 1)):
                fresh.check(f"#{dim}-{value}")
            fresh.click("#next")
            fresh.wait_for_function("document.getElementById('progress').textContent.includes('1 of 6 rated')")
            stale.click("#next")  # opened earlier, no rating set: "Save and next" sends only the comment
            stale.wait_for_function("document.getElementById('status').textContent.includes('changed elsewhere')")
            assert stale.is_checked("#consistency-3") and "1 of 6" in stale.inner_text("#position")
            stored = httpx.get(server.url + "/api/sheet").json()
            assert stored["ratings"][code] | {"comment": ""} == {
                "consistency": 3,
                "reliability": 2,
                "professionality": 1,
                "comment": "",
            }
            # a save with no rating (a comment only) keeps the stored ratings
            keep = {"comment": "看过了", "version": stored["versions"][code]}
            assert httpx.put(url, json=keep, headers={"X-Rating-Token": token}).status_code == 200
            assert httpx.get(server.url + "/api/sheet").json()["ratings"][code]["professionality"] == 1

            locker = sqlite3.connect(run / "ratings.sqlite")
            locker.execute("BEGIN EXCLUSIVE")  # another program holds the database
            assert "2 of 6" in fresh.inner_text("#position")  # the fresh tab moved on to answer 2
            fresh.check("#consistency-2")
            fresh.click("#next")
            fresh.wait_for_function("document.getElementById('status').textContent.includes('locked')", timeout=30_000)
            locker.rollback()
            locker.close()
            fresh.click("#next")  # free again: the same save goes through and the page moves on
            fresh.wait_for_function("document.getElementById('position').textContent.includes('3 of 6')")
            assert "locked" not in fresh.inner_text("#status")
            browser.close()
    finally:
        server.stop()
