"""Reliability, round two: nothing altered silently, no secret or post leaked, concurrent runs never collide,
outputs complete or absent, memory and file handles flat under load."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_DEMO, ROOT, cli_env

from mentalglm.data.io import DataError
from mentalglm.data.loaders import load_records
from mentalglm.data.paths import shared_data_dir
from mentalglm.data.splits import build_splits
from mentalglm.errors import ConfigError, OutputError, PredictionsError
from mentalglm.fileio import atomic
from mentalglm.fileio.partial import read_partial
from mentalglm.reporting.writer import score_predictions_file, write_evaluation
from mentalglm.tasks import TASKS

POST = "这是一条只为测试隐私而写的独特帖子绝不能出现在日志里"  # 26 characters: any 20 of them is a leak
SECRETS = {
    "openai": "sk-PLANTED-openai-0123456789abcdef",
    "hf": "hf_PLANTEDtokenForTheReliabilityTest",
    "mine": "PLANTED-my-own-setting-value-42",
}


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- data read exactly as written
@pytest.mark.real_data
@pytest.mark.skipif(shared_data_dir() is None, reason="no shared real data (../shared/data)")
def test_a_real_imhi_file_is_read_field_for_field_as_the_csv_module_reads_it():
    path = shared_data_dir() / "imhi/train_data/instruction_data/Irf/val.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    records = load_records("irf", path)
    assert len(records) == len(rows) == 985
    assert [[r["query"], r["answer"]] for r in records] == rows  # quoted line breaks kept in every field
    assert sum("\n" in r["answer"] for r in records) > 700


def test_error_messages_name_a_post_only_by_length_and_hash(tmp_path):
    path = tmp_path / "shifted.csv"
    path.write_text(f"id\tlabel\tcomment\r\n1\t0\t好累\r\n2\t{POST}\t1\r\n", encoding="utf-8")  # cells shifted
    with pytest.raises(DataError) as e:
        load_records(None, path)
    assert POST[:8] not in str(e.value) and "characters, sha256" in str(e.value)
    headerless = tmp_path / "noheader.tsv"
    headerless.write_text(f"{POST}\t0\t1\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records("sos_hl_1k", headerless, "sos_llm")
    assert POST[:8] not in str(e.value)


def test_credential_keys_are_told_from_settings():
    from mentalglm.tracking import is_secret_key

    for key in ("hf_token", "openai_api_key", "WANDB_API_KEY", "client_secret", "password", "aws.access-key"):
        assert is_secret_key(key), key
    for key in ("max_new_tokens", "val_max_new_tokens", "pad_token", "sort_key", "secret_keys", "tokenizer"):
        assert not is_secret_key(key), key
    assert is_secret_key("my_setting", frozenset({"my_setting"}))


# ----------------------------------------------------------------------------- leakage, duplicates, empty files
def test_posts_in_two_splits_are_reported_or_refused(tmp_path, caplog):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    rows = "".join(f"{i}\t{i % 2}\t第{i}条帖子\n" for i in range(1, 21))
    train.write_text("id\tlabel\tcomment\n" + rows, encoding="utf-8")
    test.write_text("id\tlabel\tcomment\n1\t1\t第1条帖子\n2\t0\t第2条帖子\n3\t0\t新的帖子\n", encoding="utf-8")
    spec = {"sos_hl_1k": {"train": str(train), "val_size": 4, "test": str(test)}}
    build_splits(spec, seed=0)
    assert "same post occurs in two splits" in caplog.text and "2 in" in caplog.text.replace("(", " ")
    assert "第1条" not in caplog.text
    with pytest.raises(ConfigError, match="data.on_leak=error"):
        build_splits(spec, seed=0, on_leak="error")


def write_predictions(path: Path, rows: list[dict], encoding="utf-8", end="\n", bom=b""):
    path.write_bytes(bom + (end.join(json.dumps(r, ensure_ascii=False) for r in rows) + end).encode(encoding))
    return path


ROWS = [
    {"task": "sos_hl_1k", "id": "a", "output": "该帖子的发布者有高自杀风险。", "labels": ["高自杀风险"]},
    {"task": "sos_hl_1k", "id": "b", "output": "该帖子的发布者有低自杀风险。", "labels": ["高自杀风险"]},
]


def test_a_repeated_prediction_id_is_an_error_or_kept_once(tmp_path):
    path = write_predictions(tmp_path / "p.jsonl", [*ROWS, ROWS[0]])
    with pytest.raises(PredictionsError, match="p.jsonl:3: field 'id': 'a' of task sos_hl_1k repeats line 1"):
        score_predictions_file(path, tmp_path / "out")
    metrics = score_predictions_file(path, tmp_path / "out", on_duplicate="keep_first")
    assert metrics["sos_hl_1k"]["n"] == 2 and metrics["sos_hl_1k"]["f1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("kind", ["bom", "gbk", "utf16", "cr", "crlf"])
def test_predictions_files_of_every_encoding_and_line_end_are_read(tmp_path, kind):
    args = {
        "bom": dict(bom=b"\xef\xbb\xbf"),
        "gbk": dict(encoding="gbk"),
        "utf16": dict(encoding="utf-16"),
        "cr": dict(end="\r"),
        "crlf": dict(end="\r\n"),
    }[kind]
    path = write_predictions(tmp_path / "p.jsonl", ROWS, **args)
    assert score_predictions_file(path, tmp_path / "out")["sos_hl_1k"]["n"] == 2


def test_an_empty_predictions_file_or_a_directory_is_an_error(tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n \n")
    with pytest.raises(PredictionsError):
        score_predictions_file(tmp_path / "blank.jsonl", tmp_path / "out")
    with pytest.raises(PredictionsError, match="is not a file"):
        score_predictions_file(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- outputs: complete or absent
def test_a_full_disk_leaves_no_partial_evaluation(tmp_path, monkeypatch):
    rows = [
        {
            "task": "sos_hl_1k",
            "id": "1",
            "index": 0,
            "aspect": "",
            "output": "x",
            "gold_labels": ["高自杀风险"],
            "pred_labels": [],
            "parsed": False,
        }
    ]
    results = {"sos_hl_1k": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "parse_rate": 0.0, "n": 1}}
    real, calls = atomic._stage, []

    def full_after_two(path, data):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(atomic, "_stage", full_after_two)
    with pytest.raises(OutputError, match="No space left on device"):
        write_evaluation(rows, results, tmp_path / "out", {"sos_hl_1k": TASKS["sos_hl_1k"]})
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # all files or none, no temporaries


def test_partial_predictions_round_trip_any_unicode(tmp_path):
    rows = [
        {"task": "cp", "id": str(i), "output": text}
        for i, text in enumerate(["a\u2028b", "c\u0085d", "e\x1cf", "lone \ud800 surrogate", "tab\tnew\nline"])
    ]
    atomic.append_jsonl(tmp_path / "p.jsonl", rows, fsync=True)
    assert read_partial(tmp_path / "p.jsonl") == rows


def test_outputs_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic.write_atomic(tmp_path / "m.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o640


def test_a_rerun_command_with_a_non_ascii_path_parses_in_hydra():
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mentalglm.reporting.ablation import hydra_override

    args = shlex.split(shlex.join(["python", "train.py", hydra_override("hydra.run.dir=/数据/运行 1/0")]))
    assert OverridesParser.create().parse_override(args[2]).value() == "/数据/运行 1/0"


# ----------------------------------------------------------------------------- the command line
@pytest.mark.slow
@pytest.mark.parametrize(
    "override,message",
    [
        ("seed=1.5", "seed"),
        ("data.batch_size=abc", "batch_size"),
        ("optimizer.lr=-1", "optimizer.lr=-1.0 must be positive"),
    ],
)
def test_wrong_values_end_in_one_line_before_any_model_loads(run_cli, override, message):
    proc = run_cli("train.py", *FAST_DEMO, override, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1] and "Loading weights" not in proc.stderr


@pytest.mark.slow
def test_an_unwritable_output_directory_is_one_line(run_cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    preds = write_predictions(tmp_path / "p.jsonl", ROWS)
    proc = run_cli("evaluate.py", f"predictions={preds}", f"output_dir={blocker}/out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "cannot write" in proc.stderr


@pytest.mark.slow
def test_secrets_on_the_command_line_are_in_no_file_of_the_run(run_cli, tmp_path):
    run_cli(
        "train.py",
        *FAST_DEMO,
        "variant=s2",
        "stages.two.max_epochs=1",
        "data.limit_eval=2",
        f"+openai_api_key={SECRETS['openai']}",
        f"+model.hf_token={SECRETS['hf']}",
        f"+my_setting={SECRETS['mine']}",
        "secret_keys=[my_setting]",
        "logger=default",
    )
    files = all_bytes(tmp_path / "outputs")
    assert any("/.hydra/" in f for f in files) and any("wandb" in f for f in files)
    leaks = [(name, key) for name, data in files.items() for key, secret in SECRETS.items() if secret.encode() in data]
    assert not leaks


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_malformed_row_never_puts_its_post_in_an_output(run_cli, tmp_path, on_error):
    from mentalglm.fixtures import FIXTURES_DIR

    sos = tmp_path / "sos.csv"
    good = (FIXTURES_DIR / "sos_hl_1k/suicide_train_LLM.csv").read_text(encoding="utf-8")
    sos.write_text(good + f"999\t{POST}\t1\r\n", encoding="utf-8")
    proc = run_cli(
        "train.py",
        *FAST_DEMO,
        "variant=s2",
        "stages.two.max_epochs=1",
        "data.limit_eval=2",
        f"data.tasks.sos_hl_1k.train={sos}",
        "data.answers=label_only",  # a raw SOS-HL-1K file: label-only answers
        f"data.on_error={on_error}",
        "logger=default",
        check=on_error == "skip",
    )
    texts = {**all_bytes(tmp_path / "outputs"), "console": (proc.stdout + proc.stderr).encode()}
    windows = {POST[i : i + 8] for i in range(len(POST) - 7)}
    assert not [(f, w) for f, data in texts.items() for w in windows if w.encode() in data]
    if on_error == "raise":
        assert proc.returncode == 2 and "characters, sha256" in proc.stderr
    else:
        assert "skipped 1" in (proc.stdout + proc.stderr) or any(
            "skipped" in d.decode(errors="ignore") for d in texts.values()
        )


# ----------------------------------------------------------------------------- concurrent runs
def _train(tmp: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"paths.cache_dir={cache}",
        *FAST_DEMO,
        "variant=s2",
        "test=false",
        "stages.two.max_epochs=1",
        *overrides,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=cli_env(tmp / "outputs"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_two_runs_started_at_once_never_share_a_directory(tmp_path, cli_cache):
    a, b = _train(tmp_path, cli_cache), _train(tmp_path, cli_cache)
    assert a.wait(600) == 0 and b.wait(600) == 0, (a.stderr.read()[-2000:], b.stderr.read()[-2000:])
    runs = sorted((tmp_path / "outputs" / "train").glob("*/runs/*"))
    assert len(runs) == 2 and all((r / "summary.json").is_file() for r in runs)


@pytest.mark.slow
def test_a_second_process_cannot_write_into_a_run_in_use(tmp_path, cli_cache):
    first = _train(tmp_path, cli_cache, "stages.two.max_epochs=3")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((tmp_path / "outputs" / "train").glob("*/runs/*/.in_use")):
        time.sleep(0.2)
    second = _train(tmp_path, cli_cache, "resume=true")
    assert second.wait(300) == 2
    err = second.stderr.read()
    assert "is in use by process" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert first.wait(600) == 0
    (run,) = (tmp_path / "outputs" / "train").glob("*/runs/*")
    assert not (run / ".in_use").exists()


# ----------------------------------------------------------------------------- load
@pytest.mark.slow
def test_memory_and_file_handles_stay_flat_under_repeated_work(tmp_path, cli_cache):
    script = tmp_path / "soak.py"
    script.write_text(f"""
import json, os, resource, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
from mentalglm.reporting.writer import score_predictions_file
from mentalglm.serving.predictor import Predictor, read
from mentalglm.runtime.generation import generate_batch
from mentalglm.tasks import TASKS
from omegaconf import OmegaConf

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def fds():
    return len(os.listdir("/proc/self/fd"))

preds = Path({str(tmp_path / "p.jsonl")!r})
preds.write_text("".join(json.dumps(r, ensure_ascii=False) + "\\n" for r in {ROWS!r} * 50), encoding="utf-8")
model = OmegaConf.to_container(OmegaConf.load({str(ROOT / "conf/model/tiny_glm.yaml")!r}))
p = Predictor(model, {{"sos_hl_1k": TASKS["sos_hl_1k"]}}, None, cache_dir={str(cli_cache)!r}, data={{"name": "t"}},
              generation={{}})
def one_round(i):
    score_predictions_file(preds, {str(tmp_path / "out")!r}, on_duplicate="keep_first")
warm = [one_round(i) for i in range(50)]
for _ in range(5):
    ids, _ = p.post_prompt(TASKS["sos_hl_1k"], "最近好累")
    generate_batch(p.model, p.tokenizer, [ids], max_new_tokens=8)
r0, f0 = rss(), fds()
for i in range(1000):
    one_round(i)
for i in range(50):
    ids, _ = p.post_prompt(TASKS["sos_hl_1k"], f"最近好累{{i}}")
    read(TASKS["sos_hl_1k"], generate_batch(p.model, p.tokenizer, [ids], max_new_tokens=8)[0])
print(json.dumps({{"rss0": r0, "rss1": rss(), "fd0": f0, "fd1": fds()}}))
""")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["rss1"] < 1.05 * m["rss0"], m  # RSS growth under 5%
    assert m["fd1"] <= m["fd0"], m  # no file handle left open
