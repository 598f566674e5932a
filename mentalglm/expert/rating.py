"""The rating page of the expert-evaluation kit: one rater, their blinded sheet, the rubric, progress in SQLite.

`expert_eval.py action=rate run_dir=SAMPLE_DIR rater=NAME` serves it on this machine (127.0.0.1 by default).
Every saved rating is committed to run_dir/ratings.sqlite at once, so a closed browser or a stopped server loses
nothing; "Export" writes the ratings into the rater's sheet (sheets/NAME.csv, the format action=aggregate reads)
and offers the same file as a download. The page never sees the key: it knows codes, not models.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig

from mentalglm.errors import ConfigError
from mentalglm.expert import kit
from mentalglm.network import is_loopback_host

log = logging.getLogger(__name__)
DATABASE = "ratings.sqlite"


class RatingStore:
    """One rater's ratings: {code: {dimension: value, "comment": text}}, one SQLite row per code."""

    def __init__(self, path: Path, rater: str):
        self.rater, self.lock = rater, threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS ratings (rater TEXT, code TEXT, data TEXT, updated TEXT DEFAULT "
            "CURRENT_TIMESTAMP, PRIMARY KEY (rater, code))"
        )
        self.db.commit()

    def all(self) -> dict[str, dict]:
        with self.lock:
            rows = self.db.execute("SELECT code, data FROM ratings WHERE rater = ?", (self.rater,)).fetchall()
        return {code: json.loads(data) for code, data in rows}

    def put(self, code: str, data: dict) -> None:
        with self.lock:
            self.db.execute(
                "INSERT INTO ratings (rater, code, data) VALUES (?, ?, ?) ON CONFLICT (rater, code) "
                "DO UPDATE SET data = excluded.data, updated = CURRENT_TIMESTAMP",
                (self.rater, code, json.dumps(data, ensure_ascii=False)),
            )
            self.db.commit()


def _sheet_rows(path: Path) -> tuple[list[str], list[dict]]:
    fields, rows = kit.read_csv_rows(path)
    if "code" not in fields:
        raise ConfigError(f"{path}: no column 'code' (not a sheet expert_eval.py action=sample wrote)")
    return fields, rows


def create_rating_app(sheet: Path, store: RatingStore, dims: Sequence[kit.Dimension], notice: str):
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, Response

    from mentalglm.fileio.atomic import csv_text, write_atomic

    fields, rows = _sheet_rows(sheet)
    by_code = {r["code"]: r for r in rows}
    app = FastAPI(title="MentalGLM expert rating", docs_url=None, redoc_url=None)
    # Ratings already in the sheet (a rater who began in a spreadsheet) seed the store, never overwrite it.
    stored = store.all()
    for r in rows:
        filled = {d.name: int(r[d.name]) for d in dims if (r.get(d.name) or "").strip().isdigit()}
        if filled and r["code"] not in stored:
            store.put(r["code"], filled | {kit.COMMENT: r.get(kit.COMMENT) or ""})

    def complete(data: dict) -> bool:
        return all(isinstance(data.get(d.name), int) for d in dims)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("mentalglm.expert").joinpath("rating.html").read_text(encoding="utf-8")

    @app.get("/ready")
    def ready() -> dict:
        return {"ready": True}

    @app.get("/api/sheet")
    def items() -> dict:
        return {
            "rater": store.rater,
            "notice": notice,
            "rubric": [{"name": d.name, "description": d.description, "min": d.low, "max": d.high} for d in dims],
            "items": [{k: r.get(k) or "" for k in ("code", "task", "aspect", "post", "answer")} for r in rows],
            "ratings": store.all(),
        }

    @app.put("/api/ratings/{code}")
    def rate(code: str, body: dict) -> dict:
        if code not in by_code:
            raise HTTPException(404, f"code {code!r} is not on this sheet")
        data = {}
        for d in dims:
            value = body.get(d.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not d.accepts(value):
                raise HTTPException(422, f"{d.name} must be a whole number from {d.low} to {d.high}")
            data[d.name] = value
        comment = body.get(kit.COMMENT, "")
        if not isinstance(comment, str):
            raise HTTPException(422, "comment must be text")
        store.put(code, data | {kit.COMMENT: comment})
        ratings = store.all()
        return {"rated": sum(complete(v) for v in ratings.values()), "total": len(rows)}

    @app.post("/api/export")
    def export() -> Response:
        ratings = store.all()
        filled = []
        for r in rows:
            mine = ratings.get(r["code"], {})
            filled.append(r | {d.name: mine.get(d.name, "") for d in dims} | {kit.COMMENT: mine.get(kit.COMMENT, "")})
        text = "\ufeff" + csv_text(fields, filled)
        write_atomic(sheet, text)
        done = sum(complete(v) for v in ratings.values())
        log.info("exported %d of %d ratings to %s", done, len(rows), sheet)
        headers = {"Content-Disposition": f'attachment; filename="{sheet.name}"', "X-Rated": str(done)}
        return Response(text, media_type="text/csv; charset=utf-8", headers=headers)

    return app


def serve_rating_page(cfg: DictConfig, dims: Sequence[kit.Dimension]) -> None:
    import uvicorn

    from mentalglm.commands.expert_eval import NOTICE

    if not cfg.run_dir or not cfg.rater:
        raise ConfigError("action=rate needs run_dir=PATH (the folder action=sample wrote) and rater=NAME")
    run = Path(str(cfg.run_dir))
    kit.check_rater(cfg.rater)
    sheet = run / "sheets" / f"{cfg.rater}.csv"
    if not sheet.is_file():
        known = sorted(p.stem for p in (run / "sheets").glob("*.csv"))
        raise ConfigError(f"rater={cfg.rater}: no sheet {sheet} (raters of this sample: {', '.join(known) or 'none'})")
    app = create_rating_app(sheet, RatingStore(run / DATABASE, str(cfg.rater)), dims, NOTICE)
    if not is_loopback_host(str(cfg.host)):
        log.warning("host=%s: the posts on this sheet are served beyond this machine", cfg.host)
    log.info("rating page for %s on http://%s:%d/ (progress in %s)", cfg.rater, cfg.host, cfg.port, run / DATABASE)
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_config=None, access_log=False)
