"""Multi-process training and evaluation: batch sharding, trainer configs, and 2-process CPU runs (gloo)
of train.py / evaluate.py under DDP and FSDP2 compared with single-process runs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_env

from mentalglm.data.sampler import LengthGroupedBatchSampler
from mentalglm.runtime.distributed import missing_strategy_package, shard_eval_batches, shard_train_batches

TRAINERS = ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]


# ----------------------------------------------------------------------------- shard logic
def batch_list(n_items: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n_items))) for i in range(0, n_items, size)]


@pytest.mark.parametrize("n_items,size,world", [(18, 4, 2), (17, 4, 3), (5, 4, 4), (3, 8, 2), (0, 4, 2), (40, 4, 8)])
def test_eval_shards_hold_every_item_once_with_equal_step_counts(n_items, size, world):
    batches = batch_list(n_items, size)
    shards = [shard_eval_batches(batches, r, world) for r in range(world)]
    items = sorted(i for shard in shards for b in shard for i in b)
    assert items == list(range(n_items))  # no item lost, none repeated
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) >= 1  # every rank runs the same steps, at least one
    # Whole batches move to ranks unchanged (same generation as a single process); the rest is empty padding.
    assert sorted(map(tuple, (b for s in shards for b in s if b))) == sorted(map(tuple, batches))


def test_more_ranks_than_batches_get_an_empty_batch():
    assert [shard_eval_batches([[0, 1], [2]], r, 4) for r in range(4)] == [[[0, 1]], [[2]], [[]], [[]]]


def test_train_shards_pad_by_wrapping_around():
    batches = batch_list(10, 2)  # 5 batches over 2 ranks: 3 steps each, batch 0 repeated
    shards = [shard_train_batches(batches, r, 2) for r in range(2)]
    assert shards == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [0, 1]]]
    assert shard_train_batches([], 0, 2) == []
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        shard_eval_batches(batches, 2, 2)


def test_length_grouped_sampler_shards_one_epoch_order():
    lengths = [(i * 37) % 101 + 1 for i in range(30)]
    full = list(LengthGroupedBatchSampler(lengths, 4, bucket_batches=3, seed=5))
    ranks = [LengthGroupedBatchSampler(lengths, 4, bucket_batches=3, seed=5, num_replicas=3, rank=r) for r in range(3)]
    parts = [list(s) for s in ranks]
    assert [len(p) for p in parts] == [len(s) for s in ranks] == [3, 3, 3]  # ceil(8 batches / 3)
    assert [b for step in zip(*parts) for b in step][: len(full)] == full  # rank r takes batches r, r + 3, ...


def test_sampler_refuses_lightnings_distributed_sampler_injection():
    from torch.utils.data import DistributedSampler

    # Lightning re-creates a batch sampler as cls(sampler, batch_size=..., drop_last=...) when
    # use_distributed_sampler=True: the sampler would land in `lengths`.
    sampler = DistributedSampler(list(range(8)), num_replicas=2, rank=0)
    with pytest.raises(TypeError, match="use_distributed_sampler=false"):
        LengthGroupedBatchSampler(sampler, batch_size=4, drop_last=False)


def test_empty_generation_batch_collates():
    from mentalglm.data.collate import GenerationCollator

    batch = GenerationCollator()([])
    assert batch["prompts"] == [] and batch["task"] == [] and batch["index"] == []


# ----------------------------------------------------------------------------- FSDP2 generation
def _fsdp_generation_worker(rank: int, checkpoint: str, port: int, results) -> None:
    """One of 2 gloo ranks: shard the tiny GLM with FSDP2, generate different token counts per rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mentalglm.runtime.distributed import gathered_for_generation, shard_model
    from mentalglm.runtime.generation import generate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    prompts = [tok.encode("我最近总是睡不着"), tok.encode("他说的话让我很难过，我觉得")]
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    model = shard_model(AutoModelForCausalLM.from_pretrained(checkpoint).eval(), init_device_mesh("cpu", (2,)))
    gathers = []
    original = _fsdp_param_group.foreach_all_gather
    _fsdp_param_group.foreach_all_gather = lambda *a, **k: gathers.append(1) or original(*a, **k)
    counts, same = [], True
    # Rank 0 generates 3 then 12 tokens, rank 1 2 then 5: unequal forwards per rank must not hang.
    for n in (3, 12) if rank == 0 else (2, 5):
        before = len(gathers)
        with gathered_for_generation(model):
            out = generate(model, tok, prompts, max_new_tokens=n)
        counts.append(len(gathers) - before)
        same &= out == generate(reference, tok, prompts, max_new_tokens=n)
    results[rank] = (counts, len(gathered_modules(model)), same)
    dist.destroy_process_group()


def gathered_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@pytest.mark.slow
def test_fsdp2_generation_gathers_once_per_call_not_per_token(tiny_checkpoint):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    workers = mp.spawn(_fsdp_generation_worker, args=(str(tiny_checkpoint), port, results), nprocs=2, join=False)
    for _ in range(120):  # a per-token collective with unequal token counts would hang: fail instead
        if workers.join(timeout=5):
            break
    else:
        for p in workers.processes:
            p.kill()
        pytest.fail("FSDP2 generation hung: ranks generating different token counts met in a collective")
    for rank in (0, 1):
        counts, n_fsdp, same = results[rank]
        assert counts == [n_fsdp, n_fsdp]  # one all-gather per FSDP module, however many tokens
        assert same  # sharded generation == the unsharded model's


# ----------------------------------------------------------------------------- trainer configs
@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_configs_compose_with_devices_and_nodes_from_the_cli(trainer):
    from test_config import compose_train

    cfg = compose_train([f"trainer={trainer}", "trainer.devices=8", "trainer.num_nodes=2"])
    assert cfg.trainer.devices == 8 and cfg.trainer.num_nodes == 2
    assert cfg.trainer.use_distributed_sampler is False  # the datamodule shards batches itself
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accumulate_grad_batches == 8  # from default
    assert cfg.trainer.strategy._target_.startswith("lightning.pytorch.strategies.")


@pytest.mark.parametrize("trainer,strategy", [("ddp", "DDPStrategy"), ("fsdp", "ModelParallelStrategy")])
def test_ddp_and_fsdp_trainers_instantiate_on_cpu(trainer, strategy):
    from hydra.utils import instantiate
    from test_config import compose_train

    cfg = compose_train([f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=2"])
    t = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert type(t.strategy).__name__ == strategy and t.world_size == 2  # nothing launched until fit/test


@pytest.mark.parametrize("trainer", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_without_the_package_is_a_clear_config_error(trainer):
    import importlib.util

    from test_config import compose_train

    from mentalglm.errors import ConfigError
    from mentalglm.runtime.builders import build_trainer

    cfg = compose_train([f"trainer={trainer}"])
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    assert "pip install deepspeed" in missing_strategy_package(cfg.trainer)
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        build_trainer(cfg, [], [])


def test_non_fsdp_checkpoint_cannot_resume_under_fsdp(tmp_path):
    from mentalglm.runtime.distributed import resume_strategy_problem

    fsdp = {"strategy": {"_target_": "lightning.pytorch.strategies.ModelParallelStrategy"}}
    ddp = {"strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}}
    for saved_by_fsdp in (False, True):
        path = tmp_path / f"fsdp_{saved_by_fsdp}.ckpt"
        torch.save({"state_dict": {}, "mentalglm": {"fsdp": saved_by_fsdp}}, path)
        assert (resume_strategy_problem(fsdp, str(path)) is None) is saved_by_fsdp
        assert resume_strategy_problem(ddp, str(path)) is None  # any checkpoint resumes in one process or DDP
    assert "stages.<stage>.init=" in resume_strategy_problem(fsdp, str(tmp_path / "fsdp_False.ckpt"))
    assert resume_strategy_problem(fsdp, None) is None


# ----------------------------------------------------------------------------- 2-process CPU runs
# Stage two only, a few training batches (enough for non-trivial answers), small evaluation batches so
# 18 items make 5 batches (ranks get 3 and 2 + an empty one); validation decodes exactly like the test
# (no stop strings) so evaluate.py split=val reproduces the validation numbers.
TRAIN = [
    "experiment=demo",
    "variant=s2",
    "stages.two.max_epochs=1",
    "optimizer.lr=1e-2",
    "data.limit_eval=6",
    "data.eval_batch_size=4",
    "generation.max_new_tokens=24",
    "generation.val_max_new_tokens=24",
    "generation.val_stop_strings=[]",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
]
EVAL = [
    "model=tiny_glm",
    "data=fixtures",
    "data.select=[sos_hl_1k,socialcd_3k,cp]",
    "trainer=cpu",
    "data.limit_eval=6",
    "data.eval_batch_size=4",
    "generation.max_new_tokens=24",
    "trainer.enable_progress_bar=false",
]
TWO_CPU = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def run(out: Path, cache: Path, script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = cli_env(out)
    cmd = [sys.executable, str(ROOT / script), f"paths.cache_dir={cache}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[1:])} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def only_run(out: Path) -> Path:
    (run_dir,) = sorted((out / "train").glob("*/runs/*"))
    return run_dir


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def logged_val_metrics(stage_dir: Path) -> dict[str, float]:
    (log,) = stage_dir.glob("csv/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(log.open()) if r.get("val/f1_mean")]
    return {k.removeprefix("val/"): float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cli_cache):
    """train.py with trainer=ddp on 2 CPU processes; returns (outputs root, run directory)."""
    out = tmp_path_factory.mktemp("ddp")
    run(out, cli_cache, "train.py", *TRAIN, "+trainer.limit_train_batches=25", "trainer=ddp", *TWO_CPU)
    return out, only_run(out)


@pytest.mark.slow
def test_ddp_run_writes_once_and_matches_a_single_process(ddp_run, cli_cache, tmp_path):
    out, run_dir = ddp_run
    summary = json.loads((run_dir / "summary.json").read_text())
    adapter = summary["best_adapter"]
    stage = run_dir / "stage_two"
    assert (run_dir / "train.log").read_text().count("best val/f1_mean") == 2  # two processes ran the stage

    # Checkpoints are adapter-only under DDP (and load where the adapter keys exist: single process).
    ckpt = torch.load(summary["stages"]["two"]["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])

    # Validation under DDP == the same adapter validated by one process (each item once, metrics synced).
    single_val = tmp_path / "val_single"
    run(out, cli_cache, "evaluate.py", *EVAL, f"adapter={adapter}", "split=val", f"output_dir={single_val}")
    single = json.loads((single_val / "metrics.json").read_text())
    assert {r["task"] for r in read_jsonl(single_val / "predictions.jsonl")} == {"sos_hl_1k", "socialcd_3k", "cp"}
    assert all(single[k]["n"] == 6 for k in ("sos_hl_1k", "socialcd_3k", "cp_parent"))
    logged = logged_val_metrics(stage)
    assert single["f1_mean"] > 0  # trained enough to answer: the comparison is not between zeros
    for key in ("sos_hl_1k", "socialcd_3k", "cp_parent", "cp_child"):
        for metric in ("f1", "precision", "recall", "parse_rate"):
            assert logged[f"{key}/{metric}"] == pytest.approx(single[key][metric], abs=1e-6), f"{key}/{metric}"
    assert summary["best_val_f1_mean"] == pytest.approx(single["f1_mean"], abs=1e-6)

    # The test predictions gathered from both ranks == one process: every item once, in the original order.
    single_test = tmp_path / "test_single"
    run(out, cli_cache, "evaluate.py", *EVAL, f"adapter={adapter}", f"output_dir={single_test}")
    ddp_rows = read_jsonl(run_dir / "test" / "predictions.jsonl")
    assert len(ddp_rows) == 18 and len({(r["task"], r["id"]) for r in ddp_rows}) == 18
    assert (run_dir / "test" / "predictions.jsonl").read_text() == (single_test / "predictions.jsonl").read_text()
    ddp_metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    assert "fallback" in ddp_metrics  # the run's consistency judge, which evaluate.py runs only when asked
    assert without_judge(ddp_metrics) == json.loads((single_test / "metrics.json").read_text())
    assert summary["test"]["f1_mean"] == ddp_metrics["f1_mean"]


def without_judge(metrics: dict) -> dict:
    """A train run's test metrics less its consistency judge (evaluate.py has it with label_fallback= only)."""
    return {k: v for k, v in metrics.items() if k != "fallback"}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_data_parallel_evaluate_equals_one_process(ddp_run, cli_cache, tmp_path, trainer):
    """evaluate.py across 2 processes (FSDP2: the model sharded, gathered once per batch for generation)."""
    out, run_dir = ddp_run
    adapter = json.loads((run_dir / "summary.json").read_text())["best_adapter"]
    dist_out = tmp_path / trainer
    run(
        out,
        cli_cache,
        "evaluate.py",
        *EVAL,
        f"adapter={adapter}",
        f"output_dir={dist_out}",
        f"trainer={trainer}",
        *TWO_CPU,
    )
    # The training run's test == one process (test above): so equal to it == equal to one process.
    assert (dist_out / "predictions.jsonl").read_text() == (run_dir / "test" / "predictions.jsonl").read_text()
    assert json.loads((dist_out / "metrics.json").read_text()) == without_judge(
        json.loads((run_dir / "test" / "metrics.json").read_text())
    )
    assert not list(dist_out.glob("predictions.partial*"))  # progress file removed once, after the final write


@pytest.mark.slow
def test_data_parallel_risk_scores_equal_one_process(ddp_run, cli_cache, tmp_path):
    """Label likelihoods and the calibration pass under DDP: gathered, each item once, as one process scores them."""
    out, run_dir = ddp_run
    adapter = json.loads((run_dir / "summary.json").read_text())["best_adapter"]
    runs = {}
    for name, extra in (("single", []), ("ddp", ["trainer=ddp", *TWO_CPU])):
        runs[name] = tmp_path / name
        run(
            out,
            cli_cache,
            "evaluate.py",
            *EVAL,
            f"adapter={adapter}",
            f"output_dir={runs[name]}",
            "scores.enabled=true",
            *extra,
        )
    rows = read_jsonl(runs["ddp"] / "predictions.jsonl")
    assert len(rows) == 18 and len({(r["task"], r["id"]) for r in rows}) == 18 and all("scores" in r for r in rows)
    single = read_jsonl(runs["single"] / "predictions.jsonl")
    for a, b in zip(rows, single):
        assert a["likelihood_labels"] == b["likelihood_labels"]
        assert a["calibrated_scores"] == pytest.approx(b["calibrated_scores"], abs=1e-6)
    ddp_scores = json.loads((runs["ddp"] / "metrics.json").read_text())["scores"]
    single_scores = json.loads((runs["single"] / "metrics.json").read_text())["scores"]
    assert ddp_scores["sos_hl_1k"]["calibration"]["fitted_on"] == 6  # every validation item once
    assert ddp_scores["sos_hl_1k"]["calibration"]["temperature"] == pytest.approx(
        single_scores["sos_hl_1k"]["calibration"]["temperature"], rel=1e-5
    )


@pytest.mark.slow
def test_fsdp_training_keeps_adapter_only_checkpoints_loadable_in_one_process(cli_cache, tmp_path):
    from test_config import compose_train

    from mentalglm.models.loading import load_tokenizer
    from mentalglm.runtime.builders import build_module, build_tasks

    out = tmp_path / "fsdp"
    run(out, cli_cache, "train.py", *TRAIN, "+trainer.limit_train_batches=4", "trainer=fsdp", *TWO_CPU)
    run_dir = only_run(out)
    rows = read_jsonl(run_dir / "test" / "predictions.jsonl")
    assert len(rows) == 18 and len({(r["task"], r["id"]) for r in rows}) == 18

    ckpt = torch.load(run_dir / "stage_two" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert state and all("lora_" in k for k in state)
    assert all(type(v) is torch.Tensor for v in state.values())  # gathered: no DTensor shards
    assert ckpt["mentalglm"]["fsdp"] is True

    # A single-process module of the same config takes every tensor (no missing adapter weight, no extra key).
    cfg = compose_train(["experiment=demo", "variant=s2", f"paths.cache_dir={cli_cache}"])
    tasks = build_tasks(cfg)
    module = build_module(
        cfg,
        load_tokenizer(cfg.model, cfg.paths.cache_dir),
        {t: tasks[t] for t in ("sos_hl_1k", "socialcd_3k", "cp")},
        None,
    )
    module.configure_model()
    lora_keys = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(state) == lora_keys
    result = module.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    name = next(iter(state))
    torch.testing.assert_close(module.state_dict()[name], state[name])


@pytest.mark.slow
def test_deepspeed_trainer_fails_with_one_line(cli_cache, tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    proc = run(tmp_path, cli_cache, "train.py", *TRAIN, "trainer=deepspeed_zero3", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "pip install deepspeed" in proc.stderr.strip().splitlines()[-1]
