"""The whole paper as one chain, offline, on the tiny model and the bundled SYNTHETIC fixtures (`make paper`):

    python -m mentalglm.commands.paper_chain [--out DIR] [train.py overrides ...]

 1. build C-IMHI: build_data.py asks a local teacher (the fixture teacher, mentalglm/fixtures/teacher.py)
 2. expert revision: the disagreements on the sheet get the expert's answer, then build_data.py action=merge
 3. the Table 3 sweep: train.py -m variant=s1,s2,full on the build (each job tests its best adapter)
 4. the consistency classifier: train_classifier.py run_dir=<full>
 5. evaluation with the label fallback: evaluate.py run_dir=<full> label_fallback=<classifier>
 6. the expert sample: expert_eval.py run_dir=<full>
 7. report=paper: Tables 3, 4 and S1, each row stating its data and n

Every step is the real entry point in its own process, reading the previous step's output through run_dir= /
data.dirs.c_imhi=; each writes into DIR/<step>, the full output in DIR/chain.log. The figures are a rehearsal of
the pipeline on 30-item synthetic test sets, not results to set beside the paper's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
from omegaconf import OmegaConf

from mentalglm.fileio.atomic import csv_text, read_csv, write_files_atomic
from mentalglm.network import free_port

ROOT = Path(__file__).resolve().parents[2]
TABLE3 = {"s1": "MentalGLM-chat-S1", "s2": "MentalGLM-chat-S2", "full": "MentalGLM-chat"}
QUIET = ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false"]


class ChainError(RuntimeError):
    pass


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the repository where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class Chain:
    def __init__(self, out: Path):
        self.out = out
        self.log = out / "chain.log"
        self.env = {**os.environ, "MENTALGLM_OUTPUT": str(out), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        self.seconds: dict[str, float] = {}

    def step(self, name: str, script: str, *args: str) -> None:
        """Run one entry point as a user would; its output goes to chain.log, a failure stops the chain."""
        cmd = [sys.executable, script, *args]
        shown_args = " ".join(shlex.quote(a.replace(f"{ROOT}/", "")) for a in args)  # as typed in the repository
        print(f"[{name}] python {script} {shown_args}", flush=True)
        started = time.monotonic()
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"\n===== {name}: {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.seconds[name] = round(time.monotonic() - started, 1)
        if proc.returncode != 0:
            tail = self.log.read_text(encoding="utf-8").strip().splitlines()[-1:]
            raise ChainError(f"step {name} exited {proc.returncode} ({tail[0] if tail else ''}); see {self.log}")

    def dir(self, name: str) -> Path:
        return self.out / name


def start_teacher(port: int, log: Path) -> subprocess.Popen:
    with open(log, "a", encoding="utf-8") as output:  # the child keeps its own copy of the file
        teacher = subprocess.Popen(
            [sys.executable, "-m", "mentalglm.fixtures.teacher", "--port", str(port)],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if teacher.poll() is not None:
            raise ChainError(f"the fixture teacher exited {teacher.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return teacher
        except httpx.HTTPError:
            time.sleep(0.2)
    teacher.kill()
    raise ChainError("the fixture teacher did not answer within 60 s")


def revise(build: Path) -> int:
    """The experts' part, played by the fixture rules: every row of the revision sheet gets the answer an expert
    writes (the gold label sentence, the marker, the evidence). Returns how many rows were revised."""
    from mentalglm.commands.build_data import SHEET_FIELDS
    from mentalglm.fixtures.make_fixtures import fixture_answer
    from mentalglm.tasks import TASKS

    sheet = build / "revision.csv"
    if not sheet.is_file():
        return 0
    _, rows = read_csv(sheet.read_text(encoding="utf-8"))
    for row in rows:
        task = TASKS[row["task"]]
        row["revised_answer"] = fixture_answer(task, row["post"], row["gold"].split(task.label_joiner))
    write_files_atomic({sheet: csv_text(SHEET_FIELDS, rows)})
    return len(rows)


def sweep_jobs(sweep: Path) -> dict[str, Path]:
    """variant -> job directory of the Table 3 sweep."""
    jobs = {}
    for config in sorted(sweep.glob("*/.hydra/config.yaml")):
        jobs[OmegaConf.load(config).variant] = config.parent.parent
    if sorted(jobs) != sorted(TABLE3):
        raise ChainError(f"{sweep}: expected one job per variant {sorted(TABLE3)}, found {sorted(jobs)}")
    return jobs


def rows_arg(rows: list[dict]) -> str:
    """report=paper's rows as one Hydra override, every value quoted (names hold spaces and brackets)."""

    def quoted(value: str) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "rows=[" + ", ".join("{" + ", ".join(f"{k}: {quoted(v)}" for k, v in r.items()) + "}" for r in rows) + "]"


def run_chain(out: Path, train_args: list[str]) -> dict:
    if out.exists() and any(out.iterdir()):
        raise ChainError(f"--out {out} already holds files: give a new folder (a chain never writes over another)")
    out.mkdir(parents=True, exist_ok=True)
    chain = Chain(out)
    build, sweep = chain.dir("build"), chain.dir("sweep")
    port = free_port()
    teacher = start_teacher(port, chain.log)
    try:
        chain.step(
            "build",
            "build_data.py",
            "data=fixtures_label_only",
            "expert_examples=fixtures",
            f"teacher.base_url=http://127.0.0.1:{port}/v1",
            "teacher.model=fixture-teacher",
            f"hydra.run.dir={build}",
        )
    finally:
        teacher.terminate()
        teacher.wait(timeout=30)
    revised = revise(build)
    print(f"[revise] the experts revised {revised} answers in {shown(build / 'revision.csv')}", flush=True)
    if revised:
        chain.step("merge", "build_data.py", "action=merge", f"run_dir={build}", f"hydra.run.dir={chain.dir('merge')}")
    chain.step(
        "sweep",
        "train.py",
        "experiment=demo",
        f"data.dirs.c_imhi={build}",
        "variant=s1,s2,full",
        *QUIET,
        *train_args,
        f"hydra.sweep.dir={sweep}",
        "-m",
    )
    jobs = sweep_jobs(sweep)
    full = jobs["full"]
    classifier, evaluation = chain.dir("classifier"), chain.dir("evaluate")
    chain.step("classifier", "train_classifier.py", f"run_dir={full}", f"hydra.run.dir={classifier}")
    chain.step(
        "evaluate",
        "evaluate.py",
        f"run_dir={full}",
        f"label_fallback={classifier}",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={evaluation}",
    )
    chain.step("expert_sample", "expert_eval.py", f"run_dir={full}", f"hydra.run.dir={chain.dir('expert_sample')}")
    tables = {
        "3": [{"name": f"tiny {v}", "path": str(jobs[v]), "paper": paper} for v, paper in TABLE3.items()],
        "4": [{"name": "tiny full + fallback", "path": str(evaluation), "paper": "MentalGLM-chat"}],
        "S1": [{"name": "TF-IDF (tiny run)", "path": str(classifier), "paper": "Chinese MentalBERT (test set)"}],
    }
    report = chain.dir("report")
    for table, rows in tables.items():
        chain.step(
            f"table{table}", "evaluate.py", "report=paper", f"table={table}", rows_arg(rows), f"hydra.run.dir={report}"
        )
    return {"out": out, "jobs": jobs, "report": report, "seconds": chain.seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the chain's folder (default outputs/paper_chain/<time>)")
    parser.add_argument("train_args", nargs="*", help="train.py overrides for the sweep (e.g. stages.two.max_epochs=2)")
    args = parser.parse_args(argv)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = (args.out or ROOT / "outputs" / "paper_chain" / stamp).resolve()
    started = time.monotonic()
    try:
        result = run_chain(out, args.train_args)
    except ChainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for table in ("table3", "table4", "tableS1"):
        print("\n" + (result["report"] / f"paper_{table}.md").read_text(encoding="utf-8").strip())
    minutes = (time.monotonic() - started) / 60
    steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result["seconds"].items())
    print(f"\nSteps: {steps}.")
    print(
        f"\nThe paper's chain ran in {minutes:.1f} min: the build in {shown(out / 'build')}, the sweep in "
        f"{shown(out / 'sweep')}, the tables in {shown(result['report'])}, every step's output in "
        f"{shown(out / 'chain.log')}.\nA rehearsal of the pipeline on synthetic fixtures (30 to 40 test items per "
        "task), not a result to set beside the paper's rows."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
