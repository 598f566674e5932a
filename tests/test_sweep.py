"""Sweeps: the ablation table (Table 3) of a multirun, failed jobs, W&B grouping, Optuna, memory between jobs."""

import csv
import json
import math
import shlex
import statistics
import struct
import time
from pathlib import Path

import pytest
from conftest import FAST_DEMO, ROOT
from omegaconf import OmegaConf

from mentalglm.errors import ConfigError
from mentalglm.reporting.ablation import FAILED, rebuild_ablation
from mentalglm.reporting.writer import task_summary
from mentalglm.tasks import TASKS

# The metric keys of the demo's test tasks: the table's columns.
KEYS = ["sos_hl_1k", "socialcd_3k", "cp_parent", "cp_child"]


@pytest.fixture
def run_cli(run_cli):
    """conftest's run_cli with one OpenMP thread: on a shared, loaded CPU, torch's spinning threads made an
    epoch of the tiny model 30x slower."""

    def run(script: str, *overrides: str, env: dict | None = None, **kwargs):
        return run_cli(script, *overrides, env={"OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)

    return run


# ----------------------------------------------------------------------------- helpers
def sweep_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "outputs" / "train").glob("*/multiruns/*"))


def jobs_of(sweep: Path) -> dict[str, Path]:
    return {p.name: p for p in sweep.iterdir() if (p / ".hydra" / "config.yaml").is_file()}


def job_cfg(job: Path):
    return OmegaConf.load(job / ".hydra" / "config.yaml")


def summary_of(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


def table_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """(model, variant) -> the row's cells after `variant`, from ablation.md's table."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 + len(KEYS) and cells[0] not in ("model", "---"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def wandb_records(path: Path):
    """Records of an offline W&B run file (LevelDB log format: 32 KiB blocks of crc/length/type chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, block = path.read_bytes(), 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the next block
            pos += block - pos % block
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_dir: Path) -> dict:
    """Run id, group, job type and logged history keys of one offline W&B run directory."""
    (run_file,) = run_dir.glob("run-*.wandb")
    out = {"dir": run_dir, "history": {}}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "run":
            out.update(id=record.run.run_id, group=record.run.run_group, job_type=record.run.job_type)
        elif record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                out["history"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


# A driver that runs train.py's Hydra main in this process, so it can watch objects across jobs: weak
# references to every module, model and optimizer; at each build, how many of the earlier ones are alive.
# CRASH_FIRST=1 makes the first export of a best adapter raise, i.e. a job crashing after training.
DRIVER = r"""
import json, os, sys, weakref
sys.path.insert(0, {root!r})
import mentalglm.commands.train as P
from mentalglm.models.module import MentalGLMModule

refs, alive_at_build, exports = [], [], []

def build_module(*args, _orig=P.build_module, **kwargs):
    alive_at_build.append(sum(r() is not None for r in refs))
    module = _orig(*args, **kwargs)
    refs.append(weakref.ref(module))
    return module

def configure_model(self, _orig=MentalGLMModule.configure_model):
    _orig(self)
    refs.append(weakref.ref(self.model))

def configure_optimizers(self, _orig=MentalGLMModule.configure_optimizers):
    out = _orig(self)
    refs.append(weakref.ref(out["optimizer"]))
    return out

def export_best(*args, _orig=P.export_best, **kwargs):
    exports.append(1)
    if len(exports) == 1 and os.environ.get("CRASH_FIRST") == "1":
        raise RuntimeError("simulated crash after training")
    return _orig(*args, **kwargs)

P.build_module, P.export_best = build_module, export_best
MentalGLMModule.configure_model, MentalGLMModule.configure_optimizers = configure_model, configure_optimizers
import runpy
sys.argv = ["train.py", *sys.argv[1:]]
code = 0
try:
    runpy.run_path(os.path.join({root!r}, "train.py"), run_name="__main__")  # as a script: Hydra finds conf/
except SystemExit as e:
    code = e.code
with open(os.environ["DRIVER_OUT"], "w") as f:
    exit_code = None if code in (0, None) else str(code)
    json.dump({{"alive_at_build": alive_at_build, "tracked": len(refs), "exit": exit_code}}, f)
"""


def run_driver(run_cli, tmp_path: Path, *overrides: str, crash_first: bool = False) -> dict:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    out = tmp_path / "driver.json"
    run_cli(str(driver), *overrides, env={"DRIVER_OUT": str(out), "CRASH_FIRST": "1" if crash_first else "0"})
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- the table, from fake job directories
def fake_job(
    sweep: Path,
    num: int,
    model: str,
    variant: str | None,
    seed: int,
    f1: dict | None = None,
    failed: str | None = None,
    stage: str = "two",
    test: bool = True,
) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create({"model": {"name": model}, "seed": seed, "test": test, "chain": [stage], "variant": variant}),
        job / ".hydra" / "config.yaml",
    )
    OmegaConf.save(OmegaConf.create([f"model={model}", f"seed={seed}"]), job / ".hydra" / "overrides.yaml")
    if f1 is not None:
        (job / "test").mkdir()
        tasks = task_summary({t: TASKS[t] for t in ("sos_hl_1k", "socialcd_3k", "cp")})
        (job / "test" / "metrics.json").write_text(
            json.dumps({**{k: {"f1": v, "n": 10} for k, v in f1.items()}, "tasks": tasks})
        )
    if failed is not None:
        (job / FAILED).write_text(json.dumps({"reason": failed}))
    return job


def f1s(base: float) -> dict:
    return {k: base + i / 100 for i, k in enumerate(KEYS)}


def test_table_means_and_stds_over_seeds_one_row_per_model_and_variant(tmp_path):
    sweep = tmp_path / "sweep"
    n = iter(range(100))
    for seed, base in [(1, 0.50), (2, 0.60), (3, 0.70)]:
        fake_job(sweep, next(n), "glm4_chat", "full", seed, f1s(base))
    fake_job(sweep, next(n), "glm4_chat", "s1", 1, f1s(0.30))
    fake_job(sweep, next(n), "glm4", "s2", 1, f1s(0.40))
    fake_job(sweep, next(n), "glm4", "s2", 2, failed="OutOfMemoryError: CUDA out of memory.\nTried to allocate 2 GiB")
    fake_job(sweep, next(n), "glm4", "s1", 1, failed="ConfigError: data file not found: /x/dr/train.csv")
    fake_job(sweep, next(n), "glm4", "full", 1)  # started, never finished: no metrics, no failed.json

    summary = rebuild_ablation(sweep)
    assert summary["jobs"] == 8 and summary["failed"] == 3
    md = (sweep / "ablation.md").read_text()
    rows = table_rows(md)
    assert "## The paper's Table 3 (test F1, %)" in md and "| MentalGLM-chat-S1 | 66.28 |" in md  # the reference
    # Sorted by model, then the paper's variant order.
    assert list(rows) == [("glm4", "s1"), ("glm4", "s2"), ("glm4", "full"), ("glm4_chat", "s1"), ("glm4_chat", "full")]
    full = rows[("glm4_chat", "full")]
    assert full[0] == "3"
    for i in range(len(KEYS)):
        values = [100 * (b + i / 100) for b in (0.5, 0.6, 0.7)]
        assert full[1 + i] == f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
    assert rows[("glm4_chat", "s1")][1:] == [f"{100 * (0.30 + i / 100):.2f}" for i in range(len(KEYS))]
    # A cell with some seeds failed keeps the others' numbers; an all-failed cell is marked FAILED.
    assert rows[("glm4", "s2")][0] == "1 of 2 (failed: 1)" and rows[("glm4", "s2")][1] == "40.00"
    assert rows[("glm4", "s1")] == ["0 of 1 (failed: 1)"] + ["FAILED"] * len(KEYS)
    assert rows[("glm4", "full")][1:] == ["FAILED"] * len(KEYS)
    failures = md.split("## Failed jobs", 1)[1]
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB" in failures  # one line per failure
    assert "data file not found: /x/dr/train.csv" in failures and "job did not finish" in failures
    assert f"python train.py hydra.run.dir={(sweep / '5').resolve()} model=glm4 seed=2" in failures

    with open(sweep / "ablation.csv") as f:
        table = {(r["model"], r["variant"]): r for r in csv.DictReader(f)}
    assert table[("glm4_chat", "full")]["n_seeds"] == "3"
    assert float(table[("glm4_chat", "full")]["cp_child_mean"]) == pytest.approx(
        100 * statistics.fmean([0.53, 0.63, 0.73]), abs=1e-4
    )
    assert float(table[("glm4_chat", "full")]["sos_hl_1k_std"]) == pytest.approx(10.0, abs=1e-4)
    assert table[("glm4", "s2")]["n_failed"] == "1" and table[("glm4", "s1")]["sos_hl_1k_mean"] == ""
    assert (sweep / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_job_replaces_its_failure_and_untested_jobs_are_left_out(tmp_path):
    sweep = tmp_path / "sweep"
    job = fake_job(sweep, 0, "glm4", "s1", 1, failed="RuntimeError: crash")
    fake_job(sweep, 1, "glm4", None, 1, stage="one", test=False)  # stage one alone, test=false: not a table row
    assert rebuild_ablation(sweep)["failed"] == 1
    time.sleep(0.01)
    (job / "test").mkdir()
    (job / "test" / "metrics.json").write_text(json.dumps({k: {"f1": 0.25} for k in KEYS}))  # the rerun
    summary = rebuild_ablation(sweep)
    assert summary["failed"] == 0 and summary["jobs"] == 1
    assert table_rows((sweep / "ablation.md").read_text())[("glm4", "s1")] == ["1"] + ["25.00"] * len(KEYS)


def test_rebuild_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        rebuild_ablation(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no job directories"):
        rebuild_ablation(tmp_path / "empty")
    fake_job(tmp_path / "untested", 0, "glm4", None, 1, stage="one", test=False)
    with pytest.raises(ConfigError, match="test=false"):
        rebuild_ablation(tmp_path / "untested")


# ----------------------------------------------------------------------------- composition of the paper's sweeps
def test_model_variant_seed_sweep_composes_distinct_jobs():
    """`-m model=glm4,glm4_chat variant=s1,s2,full seed=1,2,3`: 18 jobs, each its own model, variant and seed;
    stage one's registry entry is per (model, seed) and identity, so a stage-two job can only find its own."""
    from conftest import compose_config
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mentalglm.commands.train import initial_adapter, plan_stages, run_name
    from mentalglm.runtime import registry as reg

    parsed = OverridesParser.create().parse_overrides(["model=glm4,glm4_chat", "variant=s1,s2,full", "seed=1,2,3"])
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    assert len(batch) == 18
    seen, registry, names = set(), {}, set()
    for overrides in batch:
        cfg = compose_config(overrides)
        key = (cfg.model.name, cfg.variant, cfg.seed)
        assert key not in seen
        seen.add(key)
        assert (
            cfg.model.pretrained == {"glm4": "THUDM/glm-4-9b-hf", "glm4_chat": "THUDM/glm-4-9b-chat-hf"}[cfg.model.name]
        )
        plans = plan_stages(cfg)
        assert [s.name for s in plans] == {"s1": ["one"], "s2": ["two"], "full": ["one", "two"]}[cfg.variant]
        one = plan_stages(compose_config([*overrides, "~variant", "stage=one"]))[0]
        registry.setdefault((cfg.model.name, cfg.seed), set()).add(
            reg.entry_path("/r", reg.stage_identity(cfg, "one", one.tasks, "base"))
        )
        names.update(run_name(cfg, s.name) for s in plans)
        if cfg.variant == "s2":
            assert initial_adapter(cfg, plans[0], {}, []) == (None, "base")  # S2: from the base, never the registry
    assert all(len(paths) == 1 for paths in registry.values())
    assert len({p for paths in registry.values() for p in paths}) == 6
    assert len(names) == 2 * 3 * 4  # s1, s2: one stage; full: two; each W&B run named apart


def test_wandb_group_is_per_sweep():
    from conftest import compose_config
    from hydra.core.hydra_config import HydraConfig

    from mentalglm.tracking import sweep_group, wandb_group

    cfg = compose_config(["experiment=demo"])
    assert wandb_group(cfg.experiment_name) == "demo"  # a single run: grouped by experiment
    hydra_cfg = HydraConfig.instance().cfg
    try:
        multirun = compose_config(
            ["experiment=demo", "hydra.mode=MULTIRUN", "hydra.sweep.dir=/o/multiruns/2026-01-02_03-04-05"]
        )
        assert (
            wandb_group(multirun.experiment_name)
            == sweep_group("demo", "/o/multiruns/2026-01-02_03-04-05")
            == "demo-2026-01-02_03-04-05"
        )
    finally:
        HydraConfig.instance().cfg = hydra_cfg


# ----------------------------------------------------------------------------- end to end, on the tiny model
@pytest.mark.slow
def test_ablation_sweep_matches_each_jobs_metrics(run_cli, tmp_path):
    run_cli("train.py", *FAST_DEMO, "variant=s1,s2,full", "-m")
    (sweep,) = sweep_dirs(tmp_path)
    jobs = jobs_of(sweep)
    assert sorted(jobs) == ["0", "1", "2"]
    by_variant = {job_cfg(j).variant: j for j in jobs.values()}
    assert sorted(by_variant) == ["full", "s1", "s2"]
    for job in jobs.values():  # each job: its own config, split, adapter, metrics and results
        assert (job / "test" / "results.md").is_file() and (job / "summary.json").is_file()
        assert list(job.glob("stage_*/split.json")) and list(job.glob("stage_*/best_adapter/adapter_config.json"))
    s1, s2, full = (summary_of(by_variant[v]) for v in ("s1", "s2", "full"))
    assert list(s1["stages"]) == ["one"] and list(s2["stages"]) == ["two"]
    assert s2["stages"]["two"]["init_adapter"] is None  # S2 starts from the base model
    # The full job's stage two continues its own stage one, not the s1 job's (same model and seed).
    assert full["stages"]["two"]["init_adapter"] == full["stages"]["one"]["best_adapter"]
    assert Path(full["stages"]["one"]["best_adapter"]).is_relative_to(by_variant["full"])

    rows = table_rows((sweep / "ablation.md").read_text())
    assert list(rows) == [("tiny_glm", "s1"), ("tiny_glm", "s2"), ("tiny_glm", "full")]
    with open(sweep / "ablation.csv") as f:
        table = {r["variant"]: r for r in csv.DictReader(f)}
    for variant, job in by_variant.items():
        metrics = json.loads((job / "test" / "metrics.json").read_text())
        assert rows[("tiny_glm", variant)] == ["1"] + [f"{100 * metrics[k]['f1']:.2f}" for k in KEYS]
        for k in KEYS:
            assert float(table[variant][f"{k}_mean"]) == pytest.approx(100 * metrics[k]["f1"], abs=1e-4)
    assert (sweep / "ablation.png").stat().st_size > 1000

    # W&B: one offline run per stage of each job, all distinct, all in the sweep's group; the table too.
    runs = [wandb_run(d) for d in sweep.glob("*/stage_*/wandb/offline-run-*")]
    assert len(runs) == 4 and len({r["id"] for r in runs}) == 4 and len({r["dir"] for r in runs}) == 4
    group = f"demo-{sweep.name}"
    assert {r["group"] for r in runs} == {group} and {r["job_type"] for r in runs} == {"train"}
    (ablation_run,) = [wandb_run(d) for d in sweep.glob("wandb/offline-run-*")]
    assert ablation_run["group"] == group and ablation_run["job_type"] == "ablation"
    logged = ablation_run["history"]
    assert logged["ablation/_type"] == "table-file" and logged["ablation/nrows"] == 3
    wb_table = json.loads(next(sweep.glob(f"wandb/offline-run-*/files/{logged['ablation/path']}")).read_text())
    col = wb_table["columns"].index("SOS-HL-1K F1 mean")
    metrics = {v: json.loads((j / "test" / "metrics.json").read_text()) for v, j in by_variant.items()}
    assert {row[1]: row[col] for row in wb_table["data"]} == {
        v: round(100 * m["sos_hl_1k"]["f1"], 2) for v, m in metrics.items()
    }

    # The registry: one stage-one entry for (tiny_glm, seed 42), pointing into this sweep (s1 and full train the
    # same stage one: the later overwrote the earlier), and two stage-two entries (s2 from the base, full from
    # stage one: two identities).
    registry = tmp_path / "outputs" / "registry" / "tiny_glm" / "seed42"
    assert sorted(p.name for p in registry.iterdir()) == ["stage_one", "stage_two"]
    (one,) = (registry / "stage_one").glob("*.json")
    assert len(list((registry / "stage_two").glob("*.json"))) == 2
    assert Path(json.loads(one.read_text())["adapter"]).is_relative_to(sweep)


@pytest.mark.slow
def test_failed_job_does_not_end_the_sweep_and_is_marked(run_cli, tmp_path):
    """IMHI missing: S1 (stage one on IMHI) fails, S2 still runs; the sweep exits non-zero; a rerun of the
    failed job into its directory and `evaluate.py report=ablation` give the complete table."""
    missing = tmp_path / "no_imhi"
    proc = run_cli(
        "train.py",
        *FAST_DEMO,
        "stages.two.max_epochs=1",
        "variant=s1,s2",
        f"data.dirs.imhi={missing}",
        "-m",
        check=False,
    )
    assert proc.returncode != 0
    assert "1 of 2 sweep jobs failed" in proc.stderr + proc.stdout
    (sweep,) = sweep_dirs(tmp_path)
    jobs = jobs_of(sweep)
    failed, ok = jobs["0"], jobs["1"]
    assert job_cfg(failed).variant == "s1" and job_cfg(ok).variant == "s2"
    reason = json.loads((failed / FAILED).read_text())["reason"]
    assert str(missing) in reason and not (failed / "test" / "metrics.json").exists()
    assert "Traceback" in (failed / "train.log").read_text()  # the full reason is in the job's log
    assert (ok / "test" / "metrics.json").is_file() and not (ok / FAILED).exists()
    md = (sweep / "ablation.md").read_text()
    rows = table_rows(md)
    assert rows[("tiny_glm", "s1")] == ["0 of 1 (failed: 1)"] + ["FAILED"] * len(KEYS)
    assert rows[("tiny_glm", "s2")][0] == "1"
    assert str(missing) in md.split("## Failed jobs", 1)[1]

    # Rerun the failed job as ablation.md says, with the data found this time, then rebuild the table.
    rerun = next(line for line in md.splitlines() if "rerun:" in line).split("`")[1]
    args = [a for a in shlex.split(rerun)[2:] if not a.startswith(("data.dirs.imhi=", "paths.cache_dir="))]
    run_cli("train.py", *args)
    run_cli("evaluate.py", "report=ablation", f"sweep_dir={sweep}")
    rows = table_rows((sweep / "ablation.md").read_text())
    metrics = json.loads((failed / "test" / "metrics.json").read_text())
    assert rows[("tiny_glm", "s1")] == ["1"] + [f"{100 * metrics[k]['f1']:.2f}" for k in KEYS]
    assert "Failed jobs" not in (sweep / "ablation.md").read_text()


@pytest.mark.slow
def test_stage_two_seed_sweep_continues_each_seeds_own_stage_one(run_cli, tmp_path):
    run_cli(
        "train.py",
        *FAST_DEMO,
        "stages.one.max_epochs=1",
        "stages.two.max_epochs=1",
        "~variant",
        "test=false",
        "stage=one,two",
        "seed=1,2",
        "-m",
    )
    (sweep,) = sweep_dirs(tmp_path)
    runs = {(job_cfg(j).chain[0], job_cfg(j).seed): summary_of(j) for j in jobs_of(sweep).values()}
    assert sorted(runs) == [("one", 1), ("one", 2), ("two", 1), ("two", 2)]
    for seed in (1, 2):
        assert (
            runs[("two", seed)]["stages"]["two"]["init_adapter"] == runs[("one", seed)]["stages"]["one"]["best_adapter"]
        )
    assert runs[("one", 1)]["best_adapter"] != runs[("one", 2)]["best_adapter"]
    assert not (sweep / "ablation.md").exists()  # test=false: nothing to tabulate, and no job failed


@pytest.mark.slow
def test_jobs_in_one_process_release_the_previous_model(run_cli, tmp_path):
    """Job 1 crashes after training, jobs 2 and 3 finish: when each module is built, no earlier module, model
    or optimizer is still alive, collected or not (on a GPU, their memory is free for the next job)."""
    out = run_driver(
        run_cli,
        tmp_path,
        *FAST_DEMO,
        "stages.two.max_epochs=1",
        "variant=s2",
        "test=false",
        "seed=1,2,3",
        "-m",
        crash_first=True,
    )
    assert out["alive_at_build"] == [0, 0, 0] and out["tracked"] >= 9
    (sweep,) = sweep_dirs(tmp_path)
    jobs = jobs_of(sweep)
    assert "simulated crash" in json.loads((jobs["0"] / FAILED).read_text())["reason"]
    assert summary_of(jobs["1"])["best_adapter"] and summary_of(jobs["2"])["best_adapter"]
    assert out["exit"] and "1 of 1 sweep jobs failed" in out["exit"]  # the table's only row is the failed job


@pytest.mark.slow
def test_optuna_search_survives_a_failed_trial_and_reports_val_f1(run_cli, tmp_path):
    """The first trial crashes and returns None (a nan would make the sweeper's second study.tell raise and
    end the search): Optuna counts a failed trial, the next one runs, the best value is the finished trial's."""
    out = run_driver(
        run_cli,
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        *FAST_DEMO,
        "stages.two.max_epochs=1",
        "variant=s2",
        "test=false",
        crash_first=True,
    )
    assert out["exit"] is None  # a failed trial is Optuna's FAIL, not the end of the search
    assert out["alive_at_build"] == [0, 0]
    (sweep,) = sweep_dirs(tmp_path)
    jobs = jobs_of(sweep)
    assert sorted(jobs) == ["0", "1"] and (jobs["0"] / FAILED).is_file()
    scores = {}
    for name in ("1",):
        cfg = job_cfg(jobs[name])
        assert cfg.lora.r in (4, 8, 16) and cfg.lora.alpha in (16, 32, 64) and 5e-5 <= cfg.optimizer.lr <= 5e-4
        scores[name] = summary_of(jobs[name])["best_val_f1_mean"]
        assert scores[name] is not None and math.isfinite(scores[name])
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    assert result.best_value == pytest.approx(max(scores.values()))
    assert set(result.best_params) == {"lora.r", "lora.alpha", "optimizer.lr"}
    assert not (sweep / "ablation.md").exists()  # the ablation callback stays out of hyper-parameter search


@pytest.mark.slow
def test_submitit_local_runs_each_job_as_its_own_process_into_one_sweep(run_cli, tmp_path):
    """hydra/launcher=submitit_local (submitit_slurm on a cluster): one process per (variant, model, seed) job,
    every job in the driver's sweep directory, the ablation table over all of them."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    run_cli(
        "train.py", *FAST_DEMO, "stages.two.max_epochs=1", "variant=s1,s2",
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20", "-m",
    )  # fmt: skip
    (sweep,) = sweep_dirs(tmp_path)
    assert sorted(jobs_of(sweep)) == ["0", "1"]
    logs = sorted(sweep.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2 and all("Job completed successfully" in p.read_text() for p in logs)
    assert list(table_rows((sweep / "ablation.md").read_text())) == [("tiny_glm", "s1"), ("tiny_glm", "s2")]


@pytest.mark.slow
def test_optuna_studies_on_two_machines_share_one_storage(run_cli, tmp_path):
    """hydra.sweeper.storage: a second search with the same study name and database continues the first's study
    (on a cluster: a database URL every machine reaches; here SQLite)."""
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    search = ["hparams_search=optuna", "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={storage}"]
    search += [*FAST_DEMO, "stages.two.max_epochs=1", "variant=s2", "test=false"]
    for _ in range(2):
        run_cli("train.py", *search)
    study = optuna.load_study(study_name="mentalglm_lora", storage=storage)
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
