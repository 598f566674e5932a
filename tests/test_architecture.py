"""The structure's promises: tasks are data, one stage model, typed configs, one error boundary, no import cycles.

The slow test defines two tasks entirely outside the package (task files and data under tmp_path, selected from
the command line) and runs every path on them: train, validate, test, an ablation sweep and offline scoring.
"""

import ast
import csv
import json
import random
from pathlib import Path

import pytest
from conftest import FAST_DEMO, ROOT, compose_config

from mentalglm.errors import ConfigError
from mentalglm.tasks import TASKS, load_task_file, resolve_tasks, task_from_spec

# ----------------------------------------------------------------------------- tasks defined outside the package
ZH_TASK = """\
name: sleep_mood
display_name: Sleep-Mood
language: zh
kind: multilabel
labels: [失眠, 焦虑, 孤独]
label_display_names: {失眠: insomnia, 焦虑: anxiety, 孤独: loneliness}
query_template: '帖子："{post}" 问题：这个帖子提到了哪些困扰？'
answer_template: 困扰：{labels}。
format:
  delimiter: "\\t"
  id: 编号
  text: 正文
  labels: {column: 标签, sep: "|"}
"""
EN_TASK = """\
name: burnout
display_name: Burnout
language: en
kind: binary
labels: ["no", "yes"]
positive: "yes"
query_template: 'Consider this post: "{post}" Question: Is the poster burnt out?'
label_sentences:
  "yes": Yes, the poster is burnt out.
  "no": No, the poster is not burnt out.
aliases: {"yes": ["yes"], "no": ["no", "not"]}
explanation_marker: "Reasoning: "
explanation_sep: " "
case_sensitive: false
format:
  delimiter: ","
  text: post
  labels: {column: burnt_out, values: {"0": "no", "1": "yes"}}
"""
ZH_CUES = {"失眠": "整夜睡不着", "焦虑": "心里一直很慌", "孤独": "没有人陪我说话"}
EN_CUES = {"yes": "I am exhausted by work and feel empty every day.", "no": "I had a relaxing and happy weekend."}


def write_custom_tasks(root: Path) -> list[str]:
    """Task files and data files of two new tasks; the overrides that select them."""
    rng = random.Random(7)
    (root / "zh.yaml").write_text(ZH_TASK, encoding="utf-8")
    (root / "en.yaml").write_text(EN_TASK, encoding="utf-8")
    for split, n in (("train", 60), ("test", 12)):
        rows = [["编号", "正文", "标签"]]
        for i in range(n):
            labels = rng.sample(list(ZH_CUES), rng.choice([1, 1, 2]))
            rows.append([f"{split}{i}", "最近" + "，".join(ZH_CUES[lab] for lab in labels) + "。", "|".join(labels)])
        with open(root / f"zh_{split}.tsv", "w", encoding="utf-8", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(rows)
    for split, n in (("train", 40), ("val", 10)):
        with open(root / f"en_{split}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["post", "burnt_out"])
            for i in range(n):
                label = "yes" if i % 2 else "no"
                w.writerow([f"Post {i}. {EN_CUES[label]}", int(label == "yes")])
    return [
        f"+data.tasks.sleep_mood={{definition:'{root / 'zh.yaml'}',stage:two,train:'{root / 'zh_train.tsv'}',"
        f"val_size:10,test:'{root / 'zh_test.tsv'}'}}",
        f"+data.tasks.burnout={{definition:'{root / 'en.yaml'}',stage:one,train:'{root / 'en_train.csv'}',"
        f"val:'{root / 'en_val.csv'}'}}",
        "data.select=[burnout,sleep_mood]",
        "data.answers=label_only",  # their files hold labels, no explanations
    ]


def test_a_task_file_reads_into_the_typed_task(tmp_path):
    write_custom_tasks(tmp_path)
    zh, en = load_task_file(tmp_path / "zh.yaml"), load_task_file(tmp_path / "en.yaml")
    assert zh.labels == ("失眠", "焦虑", "孤独") and zh.metric_keys == ("sleep_mood",)
    assert zh.label_display_name("孤独") == "loneliness" and zh.format["labels"]["sep"] == "|"
    assert en.format_answer(["yes"], "tired.") == "Yes, the poster is burnt out. Reasoning: tired."
    from mentalglm.data.loaders import load_records

    records = load_records(zh, tmp_path / "zh_train.tsv")
    assert len(records) == 60 and records[0]["id"] == "train0" and records[0]["answer"].startswith("困扰：")
    assert {r["labels"][0] for r in load_records(en, tmp_path / "en_val.csv")} == {"yes", "no"}


def test_built_in_tasks_are_task_files():
    names = {p.stem for p in (ROOT / "conf" / "tasks").glob("*.yaml")}
    assert names == set(TASKS) and {"sos_hl_1k", "socialcd_3k", "cp"} <= names
    cp = TASKS["cp"]
    assert cp.labels[:4] == ("触发性事件", "认知歪曲", "情绪反应", "驳斥") and len(cp.children) == 19
    assert cp.metric_display_names == {"cp_parent": "CP (parent)", "cp_child": "CP (child)"}


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            {
                "name": "x",
                "kind": "binary",
                "query_template": "{post}",
                "labels": ["a", "b"],
                "answer_template": "{labels}",
            },
            "positive",
        ),
        (
            {
                "name": "x",
                "kind": "multilabel",
                "query_template": "no slot",
                "labels": ["a"],
                "answer_template": "{labels}",
            },
            "{post}",
        ),
        (
            {
                "name": "x",
                "kind": "multilabel",
                "query_template": "{post}",
                "labels": ["a"],
                "answer_template": "{labels}",
                "lables": ["typo"],
            },
            "lables",
        ),
        (
            {
                "name": "x",
                "kind": "multilabel",
                "query_template": "{post}",
                "labels": ["a"],
                "answer_template": "{labels}",
                "aliases": {"b": ["bee"]},
            },
            "not labels of the task",
        ),
        (
            {
                "name": "f1_mean",
                "kind": "multilabel",
                "query_template": "{post}",
                "labels": ["a"],
                "answer_template": "{labels}",
            },
            "other than",
        ),
        ({"name": "x", "kind": "ranking", "query_template": "{post}", "labels": ["a"]}, "kind"),
    ],
)
def test_bad_task_definitions_are_one_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        task_from_spec(spec, "my_task.yaml")


def test_data_entries_resolve_to_tasks(tmp_path):
    write_custom_tasks(tmp_path)
    tasks = resolve_tasks(
        {"sos_hl_1k": {}, "sleep_mood": {"definition": str(tmp_path / "zh.yaml")}},
        {"sos_hl_1k": {"answer_template": "风险：{labels}"}},
    )
    assert list(tasks) == ["sos_hl_1k", "sleep_mood"] and tasks["sos_hl_1k"].answer_template == "风险：{labels}"
    with pytest.raises(ConfigError, match="no built-in task is called 'nope'"):
        resolve_tasks({"nope": {}})
    with pytest.raises(ConfigError, match="the key must be the task name"):
        resolve_tasks({"other": {"definition": str(tmp_path / "zh.yaml")}})
    with pytest.raises(ConfigError, match="unknown keys"):
        resolve_tasks({"sos_hl_1k": {}}, {"sos_hl_1k": {"query_tempalte": "{post}"}})


def test_reports_and_columns_follow_the_selected_tasks(tmp_path):
    from mentalglm.commands.train import plan_stages
    from mentalglm.runtime.builders import build_tasks, selected_tasks, test_tasks

    overrides = write_custom_tasks(tmp_path)
    cfg = compose_config(["experiment=demo", *overrides])
    tasks = build_tasks(cfg)
    selected = selected_tasks(cfg, tasks)
    assert selected == ["burnout", "sleep_mood"] and test_tasks(cfg, selected) == ["sleep_mood"]
    assert [(p.name, p.tasks) for p in plan_stages(cfg)] == [("one", ["burnout"]), ("two", ["sleep_mood"])]


# ----------------------------------------------------------------------------- one stage model, typed configs
def test_stage_and_variant_are_thin_configs_over_the_chain():
    from mentalglm.commands.train import plan_stages

    assert [p.name for p in plan_stages(compose_config([]))] == ["two"]
    s2 = compose_config(["variant=s2", "stages.two.max_epochs=3"])
    assert [(p.name, p.init, p.max_epochs) for p in plan_stages(s2)] == [("two", "base", 3)]
    full = compose_config(["variant=full", "stages.one.max_epochs=1"])
    assert [(p.name, p.init, p.max_epochs) for p in plan_stages(full)] == [("one", "base", 1), ("two", "one", 10)]


@pytest.mark.parametrize(
    "override", ["data.bach_size=3", "stage.max_epochs=1", "optimizer.lr=fast", "lora.r=8.5", "model.dtpye=float32"]
)
def test_a_misspelt_or_mistyped_key_is_an_error(override):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises((HydraException, OmegaConfBaseException)):
        compose_config(["variant=full", override])


def test_a_typo_in_an_experiment_file_is_an_error(tmp_path):
    from hydra.errors import HydraException

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\noptimizer:\n  learning_rate: 1.0\n")
    with pytest.raises(HydraException, match="learning_rate"):
        compose_config([f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo"])


def test_every_knob_has_one_default():
    """Group files override the schema's defaults only with values that differ from them."""
    from omegaconf import OmegaConf

    from mentalglm.config import GenerationConfig, LoraConfig, ModelConfig, OptimizerConfig

    for group, schema in (
        ("lora", LoraConfig),
        ("optimizer", OptimizerConfig),
        ("generation", GenerationConfig),
        ("model", ModelConfig),
    ):
        defaults = OmegaConf.to_container(OmegaConf.structured(schema))
        for path in (ROOT / "conf" / group).glob("*.yaml"):
            own = {k: v for k, v in (OmegaConf.to_container(OmegaConf.load(path)) or {}).items() if k != "defaults"}
            same = [k for k, v in own.items() if k in defaults and defaults[k] == v and k != "name"]
            assert not same, f"{path.name} repeats the schema's defaults for {same}"


# ----------------------------------------------------------------------------- the registry's identity
def test_registry_finds_only_an_identical_stage(tmp_path):
    from mentalglm.runtime import registry

    cfg = compose_config(["experiment=demo"])
    identity = registry.stage_identity(cfg, "one", ["dr"], "base")
    registry.register(tmp_path, identity, tmp_path / "adapter", tmp_path, 0.5)
    assert registry.lookup(tmp_path, identity, "cmd")["adapter"] == str((tmp_path / "adapter").resolve())
    other = registry.stage_identity(compose_config(["experiment=demo", "lora.r=4"]), "one", ["dr"], "base")
    with pytest.raises(ConfigError, match=r"differ in lora .*Produce it with `cmd`"):
        registry.lookup(tmp_path, other, "cmd")
    renamed = registry.stage_identity(
        compose_config(["experiment=demo", "experiment_name=other"]), "one", ["dr"], "base"
    )
    with pytest.raises(ConfigError, match="differ in experiment"):
        registry.lookup(tmp_path, renamed, "cmd")


def test_continuing_an_adapter_with_another_lora_config_is_an_error(tmp_path):
    from mentalglm.config import LoraConfig
    from mentalglm.models.loading import check_same_lora

    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": 16, "lora_alpha": 32, "target_modules": ["v_proj", "q_proj"]})
    )
    check_same_lora(tmp_path, LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match=r"r 16 \(lora config: 8\)"):
        check_same_lora(tmp_path, LoraConfig(r=8, alpha=32, target_modules=["q_proj", "v_proj"]))


# ----------------------------------------------------------------------------- fixtures, layout
def test_fixtures_of_one_task_do_not_depend_on_the_others(tmp_path, monkeypatch):
    from mentalglm.fixtures import FIXTURES_DIR, make_fixtures

    def new_task(rng, out):
        (out / "new_task").mkdir(parents=True)
        (out / "new_task" / "train.txt").write_text("".join(f"{rng.random()}\n" for _ in range(5)))

    monkeypatch.setitem(make_fixtures.WRITERS, "aaa_new_task", new_task)  # written first, drawing first
    make_fixtures.make(tmp_path)
    for path in FIXTURES_DIR.rglob("*"):
        if path.is_file() and path.suffix in (".csv", ".tsv", ".txt", ".json", ".jsonl"):
            assert (tmp_path / path.relative_to(FIXTURES_DIR)).read_bytes() == path.read_bytes(), path.name


def _module_imports(path: Path, package: str) -> set[str]:
    """The mentalglm modules a module imports at import time (function-level imports are not cycles)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mentalglm"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mentalglm"))
    return out


def test_no_import_cycles_between_modules():
    pkg = ROOT / "mentalglm"
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in pkg.rglob("*.py")
    }
    graph = {m: {i for i in _module_imports(p, "mentalglm") if i in modules} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(stack + [m, n])}"
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


# ----------------------------------------------------------------------------- end to end, entirely outside the package
@pytest.mark.slow
def test_new_tasks_train_validate_test_ablate_and_score_end_to_end(run_cli, tmp_path):
    custom = tmp_path / "custom"
    custom.mkdir()
    overrides = write_custom_tasks(custom)
    run_cli("train.py", *FAST_DEMO, *overrides, "variant=s1,s2,full", "-m")
    (sweep,) = sorted((tmp_path / "outputs" / "train").glob("*/multiruns/*"))
    ablation = (sweep / "ablation.md").read_text(encoding="utf-8")
    assert "Sleep-Mood F1" in ablation and "SOS-HL-1K" not in ablation
    jobs = [p for p in sweep.iterdir() if (p / "test" / "metrics.json").is_file()]
    assert len(jobs) == 3
    for job in jobs:
        metrics = json.loads((job / "test" / "metrics.json").read_text())
        assert metrics["tasks"]["sleep_mood"]["display_name"] == "Sleep-Mood" and "sleep_mood" in metrics
        results = (job / "test" / "results.md").read_text(encoding="utf-8")
        assert "| Sleep-Mood |" in results and "insomnia" in results
        csv_log = next(job.glob("stage_*/csv/*/metrics.csv")).read_text()
        assert "val/" in csv_log  # validated every epoch on its own tasks

    rows = [json.loads(line) for line in (jobs[0] / "test" / "predictions.jsonl").read_text().splitlines()]
    preds = tmp_path / "preds.jsonl"
    preds.write_text(
        "".join(
            json.dumps({"task": r["task"], "output": r["output"], "labels": r["gold_labels"]}, ensure_ascii=False)
            + "\n"
            for r in rows
        ),
        encoding="utf-8",
    )
    out = tmp_path / "scored"
    run_cli("evaluate.py", f"predictions={preds}", f"output_dir={out}", *overrides[:2])
    scored = json.loads((out / "metrics.json").read_text())
    original = json.loads((jobs[0] / "test" / "metrics.json").read_text())
    assert scored["sleep_mood"]["f1"] == pytest.approx(original["sleep_mood"]["f1"])
    assert "| Sleep-Mood |" in (out / "results.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_user_errors_end_in_one_line_and_exit_2_with_the_traceback_in_the_log(run_cli, tmp_path):
    proc = run_cli("train.py", *FAST_DEMO, "~variant", "stage=two", "test=false", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no registered stage-one adapter")
    (log,) = (tmp_path / "outputs" / "train").glob("*/runs/*/train.log")
    assert "Traceback" in log.read_text()

    proc = run_cli("train.py", *FAST_DEMO, "stage=two", check=False)  # with the demo's variant=full
    assert proc.returncode == 2 and "both choose the stages" in proc.stderr.strip().splitlines()[-1]
    proc = run_cli("train.py", *FAST_DEMO, "data.bach_size=3", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "bach_size" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_console_shows_each_log_line_once(run_cli):
    proc = run_cli("train.py", *FAST_DEMO, "variant=s2", "stages.two.max_epochs=1", "test=false")
    console = proc.stdout + proc.stderr
    assert console.count("stage two: tasks") == 1
    assert console.count("Seed set to 42") == 1
