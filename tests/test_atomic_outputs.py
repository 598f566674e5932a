"""Atomic outputs: a crash mid-write leaves the previous file (or none), never half a file; an interrupted
evaluate.py resumes from the predictions it had written instead of regenerating them."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, cli_env

from mentalglm.errors import ConfigError
from mentalglm.fileio import atomic
from mentalglm.fileio.atomic import replace_dir_atomic
from mentalglm.fileio.partial import PARTIAL, PartialPredictions, read_partial
from mentalglm.reporting.writer import write_evaluation
from mentalglm.tasks import TASKS


class Crash(Exception):
    pass


def crash(*args, **kwargs):
    raise Crash()


def test_write_atomic_crash_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic.write_json_atomic(path, {"f1": 0.5})
    monkeypatch.setattr(atomic.os, "fsync", crash)  # dies after writing the data, before the rename
    with pytest.raises(Crash):
        atomic.write_json_atomic(path, {"f1": 0.9, "more": "x" * 100_000})
    assert json.loads(path.read_text()) == {"f1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_evaluation_files_survive_a_crash_while_writing_the_next_ones(tmp_path, monkeypatch):
    rows = [
        {
            "task": "sos_hl_1k",
            "id": "1",
            "index": 0,
            "aspect": "",
            "output": "有自杀倾向",
            "gold_labels": ["有"],
            "pred_labels": ["有"],
            "parsed": True,
        }
    ]
    results = {"sos_hl_1k": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "parse_rate": 1.0, "n": 1}}
    tasks = {"sos_hl_1k": TASKS["sos_hl_1k"]}
    write_evaluation(rows, results, tmp_path, tasks)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    replaced = []

    def replace_then_crash(src, dst):  # predictions.jsonl goes through, then the crash hits metrics.json
        if replaced:
            raise Crash()
        replaced.append(dst)
        os.rename(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_then_crash)
    with pytest.raises(Crash):
        write_evaluation(rows * 2, {"sos_hl_1k": {**results["sos_hl_1k"], "n": 2}}, tmp_path, tasks)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after.keys() == before.keys()
    assert after["metrics.json"] == before["metrics.json"] and after["results.md"] == before["results.md"]
    assert after["predictions.jsonl"].count(b"\n") == 2  # the one file written: complete


def test_adapter_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "best_adapter"
    replace_dir_atomic(target, lambda d: (d.mkdir(), (d / "adapter_model.safetensors").write_text("old")))

    def half_written(d):
        d.mkdir()
        (d / "adapter_config.json").write_text("{")
        raise Crash()

    with pytest.raises(Crash):
        replace_dir_atomic(target, half_written)
    assert [p.name for p in target.iterdir()] == ["adapter_model.safetensors"]
    replace_dir_atomic(target, lambda d: (d.mkdir(), (d / "adapter_model.safetensors").write_text("new")))
    assert (target / "adapter_model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_adapter"]


def test_outputs_are_written_only_through_the_atomic_helpers():
    """Run outputs (metrics, predictions, reports, plots, split, registry, sweep summary) never use a plain write."""
    # vllm.py opens the vLLM server's log for its output (a log, appended as the process writes it).
    allowed = {
        "mentalglm/fileio/atomic.py",
        "mentalglm/fixtures/make_fixtures.py",
        "mentalglm/models/tiny.py",
        "mentalglm/serving/vllm.py",
        "mentalglm/commands/paper_chain.py",  # chain.log: each step's output appended as the step runs
    }
    plain = re.compile(r"\.write_text\(|\.write_bytes\(|open\([^)]*['\"][wa]b?['\"]|\.savefig\([^b]|json\.dump\(")
    for path in sorted((ROOT / "mentalglm").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel not in allowed:
            assert not plain.search(path.read_text()), rel


# ----------------------------------------------------------------------------- evaluate.py's partial predictions
def test_torn_last_line_is_dropped_and_cut(tmp_path):
    path = tmp_path / PARTIAL
    atomic.append_jsonl(path, [{"task": "cp", "id": "1"}, {"task": "cp", "id": "2"}], fsync=True)
    with open(path, "ab") as f:
        f.write(b'{"task": "cp", "i')  # the crash hit mid-append
    assert [r["id"] for r in read_partial(path)] == ["1", "2"]
    atomic.append_jsonl(path, {"task": "cp", "id": "3"})
    assert [r["id"] for r in read_partial(path)] == ["1", "2", "3"]


def test_partial_predictions_of_other_settings_are_refused(tmp_path):
    PartialPredictions(tmp_path, {"split": "test", "shots": 0}).start(resume=False)
    atomic.append_jsonl(tmp_path / PARTIAL, {"task": "cp", "id": "1"})
    with pytest.raises(ConfigError, match=r"other settings \(shots\).*without resume=true"):
        PartialPredictions(tmp_path, {"split": "test", "shots": 3}).start(resume=True)
    assert PartialPredictions(tmp_path, {"split": "test", "shots": 0}).start(resume=True) == [{"task": "cp", "id": "1"}]
    assert PartialPredictions(tmp_path, {"split": "test", "shots": 0}).start(resume=False) == []  # fresh: discarded


EVALUATE = [
    "model=tiny_glm",
    "data=fixtures",
    "trainer=cpu",
    "logger=csv",
    "data.limit_eval=8",
    "data.eval_batch_size=2",
    "generation.max_new_tokens=24",
    "trainer.enable_progress_bar=false",
]


@pytest.mark.slow
def test_interrupted_evaluate_resumes_from_written_predictions(run_cli, tmp_path, cli_cache):
    env = cli_env(tmp_path / "outputs")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "evaluate.py"), f"paths.cache_dir={cli_cache}", *EVALUATE],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pattern = f"evaluate/*/runs/*/{PARTIAL}"
    deadline = time.monotonic() + 600  # a guard against a hung child, not a timing assertion
    try:
        while not any(p.stat().st_size for p in (tmp_path / "outputs").glob(pattern)):
            assert proc.poll() is None and time.monotonic() < deadline, "evaluate.py ended before writing predictions"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    (run,) = (tmp_path / "outputs" / "evaluate").glob("*/runs/*")
    with open(run / PARTIAL, "ab") as f:
        f.write(b'{"task": "sos_hl_1k", "id": "4')  # and as if the kill had torn the last line
    done = read_partial(run / PARTIAL)
    total = 3 * 8  # data.limit_eval=8 test items of each C-IMHI task
    assert 0 < len(done) < total and not (run / "metrics.json").exists()

    resumed = run_cli("evaluate.py", *EVALUATE, "resume=true")
    match = re.search(r"resuming: (\d+) of (\d+) items already predicted, generating the other (\d+)", resumed.stdout)
    assert match and (int(match[1]), int(match[2]), int(match[3])) == (len(done), total, total - len(done))
    assert not (run / PARTIAL).exists()  # served its purpose

    run_cli("evaluate.py", *EVALUATE)  # uninterrupted
    (reference,) = [r for r in (tmp_path / "outputs" / "evaluate").glob("*/runs/*") if r != run]
    assert (run / "predictions.jsonl").read_text() == (reference / "predictions.jsonl").read_text()
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    assert len((reference / "predictions.jsonl").read_text().splitlines()) == total
