"""Privacy and secrets: the demo's logs, CSV logs, W&B offline files and console hold no post text, and no
credential from the environment shows up in saved configs, W&B or logs.

One cut-down demo run (log_text=true: the W&B sample table, model outputs only) and one evaluate.py run
(log_text default: no table), both with fake credentials in the environment.
"""

from pathlib import Path

import pytest
from conftest import FAST_DEMO, compose_config
from omegaconf import OmegaConf

from mentalglm.data.splits import build_splits

pytestmark = pytest.mark.slow

SECRETS = {
    "WANDB_API_KEY": "f4kef4kef4kef4kef4kef4kef4kef4kef4kef4ke",  # 40 characters, like a real one
    "HF_TOKEN": "hf_FakeTokenForTheMentalGLMPrivacyTest",
    "MENTALGLM_TEST_SECRET_KEY": "sk-fake-secret-value-0123456789",
}
# Model outputs and weights are not logs; everything else a run writes is searched.
NOT_SEARCHED = {".ckpt", ".safetensors", ".png", ".bin"}
NOT_SEARCHED_NAMES = {"predictions.jsonl"}


def fixture_posts() -> list[str]:
    """The post text of every fixture item (the span of the query that is the post)."""
    cfg = compose_config(["data=fixtures"], output_dir="/tmp/mentalglm-privacy")
    splits = build_splits(OmegaConf.to_container(cfg.data.tasks, resolve=True), seed=42)
    posts = {
        r["query"][r["post_start"] : r["post_end"]].strip()
        for rows in splits.values()
        for r in rows
        if r["post_start"] >= 0
    }
    return sorted(p for p in posts if p)


WIDTH = 20  # characters: any 20 consecutive characters of a post found anywhere count as a leak


def windows(posts: list[str], width: int = WIDTH) -> set[str]:
    """Every `width`-character window of every post, so a quoted fragment is caught, not only whole posts."""
    return {post[i : i + width] for post in posts for i in range(len(post) - width + 1)}


def searched_files(run: Path) -> list[Path]:
    return [
        p for p in run.rglob("*") if p.is_file() and p.suffix not in NOT_SEARCHED and p.name not in NOT_SEARCHED_NAMES
    ]


def post_leaks(texts: dict[str, bytes], post_windows: set[str], width: int = WIDTH) -> list[str]:
    found = []
    for name, data in texts.items():
        # Binary files (W&B's protobuf log) keep their strings as contiguous UTF-8: dropping the rest is safe.
        text = data.decode("utf-8", errors="ignore")
        hit = next(
            (text[i : i + width] for i in range(len(text) - width + 1) if text[i : i + width] in post_windows), None
        )
        if hit is not None:
            found.append(f"{name}: {hit!r}")
    return found


def secret_leaks(texts: dict[str, bytes], secrets) -> list[str]:
    return [f"{name}: {s[:6]}..." for name, data in texts.items() for s in secrets if s.encode() in data]


def run_texts(run: Path, *procs) -> dict[str, bytes]:
    texts = {str(p.relative_to(run)): p.read_bytes() for p in searched_files(run)}
    for i, proc in enumerate(procs):
        texts[f"console {i} stdout"] = proc.stdout.encode()
        texts[f"console {i} stderr"] = proc.stderr.encode()
    return texts


def test_no_post_text_or_secret_in_logs_wandb_or_configs(run_cli, tmp_path):
    posts = fixture_posts()
    assert len(posts) > 300  # every fixture task contributes
    post_windows = windows(posts)

    train = run_cli("train.py", *FAST_DEMO, "stages.two.max_epochs=1", "log_text=true", env=SECRETS)
    (run,) = (tmp_path / "outputs" / "train").glob("*/runs/*")
    wandb_runs = sorted(run.glob("stage_*/wandb/offline-run-*"))
    assert len(wandb_runs) == 2  # offline although a WANDB_API_KEY is set: WANDB_MODE=offline wins
    tables = list(run.glob("stage_two/wandb/offline-run-*/files/media/table/test/samples_*.table.json"))
    assert len(tables) == 1 and '"output"' in tables[0].read_text()  # log_text=true: the sample table

    evaluate = run_cli(
        "evaluate.py",
        "model=tiny_glm",
        "data=fixtures",
        "trainer=cpu",
        "logger=default",
        f"run_dir={run}",
        "data.limit_eval=4",
        "generation.max_new_tokens=16",
        env=SECRETS,
    )
    (eval_run,) = (tmp_path / "outputs" / "evaluate").glob("*/runs/*")
    assert list(eval_run.glob("wandb/offline-run-*"))
    assert not list(eval_run.rglob("*.table.json"))  # log_text defaults to false: no sample table

    texts = {**run_texts(run, train), **{f"evaluate/{k}": v for k, v in run_texts(eval_run, evaluate).items()}}
    assert any(name.endswith("train.log") for name in texts) and any(".wandb" in name for name in texts)
    assert any(name.endswith("metrics.csv") for name in texts) and any("config.yaml" in name for name in texts)
    assert not post_leaks(texts, post_windows)
    assert not secret_leaks(texts, SECRETS.values())


def test_the_search_finds_a_post_fragment_where_there_is_one():
    """The check above can fail: a fragment of a post quoted in a log line or inside a binary file is found."""
    posts = fixture_posts()
    post = max(posts, key=len)
    post_windows = windows(posts)
    assert post_leaks({"train.log": f"[INFO] - bad row: {post[7 : 7 + WIDTH]}...".encode()}, post_windows)
    assert post_leaks({"run.wandb": b"\x00\x9f\x12" + post[3:40].encode() + b"\xff\x00"}, post_windows)
    assert not post_leaks({"train.log": f"[INFO] - bad row: {post[7 : 6 + WIDTH]}...".encode()}, post_windows)
    assert secret_leaks({"config.yaml": f"key: {SECRETS['HF_TOKEN']}".encode()}, SECRETS.values())
