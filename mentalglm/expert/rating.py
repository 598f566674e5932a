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


class Conflict(Exception):
    """A save based on an older version of an answer's ratings than the stored one."""

    def __init__(self, stored: dict, version: int):
        super().__init__("conflict")
        self.stored, self.version = stored, version


class RatingStore:
    """One rater's ratings: {code: {dimension: value, "comment": text}}, one SQLite row per code, with a version
    that each save raises (a save based on an older version is a `Conflict`, not an overwrite)."""

    def __init__(self, path: Path, rater: str):
        self.rater, self.lock, self.path = rater, threading.Lock(), path
        # A short wait: a database locked by another program is reported to the rater, not waited on for minutes.
        self.db = sqlite3.connect(str(path), check_same_thread=False, timeout=2)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS ratings (rater TEXT, code TEXT, data TEXT, updated TEXT DEFAULT "
            "CURRENT_TIMESTAMP, version INTEGER DEFAULT 0, PRIMARY KEY (rater, code))"
        )
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(ratings)")}
        if "version" not in columns:  # a database from before versions
            self.db.execute("ALTER TABLE ratings ADD COLUMN version INTEGER DEFAULT 0")
        self.db.commit()

    def all(self) -> dict[str, dict]:
        return {code: data for code, (data, _) in self.versioned().items()}

    def versioned(self) -> dict[str, tuple[dict, int]]:
        with self.lock:
            rows = self.db.execute("SELECT code, data, version FROM ratings WHERE rater = ?", (self.rater,)).fetchall()
        return {code: (json.loads(data), version or 0) for code, data, version in rows}

    def put(self, code: str, data: dict, based_on: int | None = None) -> int:
        """Merge `data` into the stored ratings of `code` (a dimension left out keeps its stored value); `based_on`:
        the version the change was made on (None: no check). Returns the new version."""
        with self.lock:
            try:
                row = self.db.execute(
                    "SELECT data, version FROM ratings WHERE rater = ? AND code = ?", (self.rater, code)
                ).fetchone()
                stored, version = (json.loads(row[0]), row[1] or 0) if row else ({}, 0)
                if based_on is not None and based_on != version:
                    raise Conflict(stored, version)
                self.db.execute(
                    "INSERT INTO ratings (rater, code, data, version) VALUES (?, ?, ?, ?) ON CONFLICT (rater, code) "
                    "DO UPDATE SET data = excluded.data, version = excluded.version, updated = CURRENT_TIMESTAMP",
                    (self.rater, code, json.dumps(stored | data, ensure_ascii=False), version + 1),
                )
                self.db.commit()
            except sqlite3.Error:
                self.db.rollback()  # a locked database: the next save starts clean
                raise
            return version + 1


def _sheet_rows(path: Path) -> tuple[list[str], list[dict]]:
    fields, rows = kit.read_csv_rows(path)
    if "code" not in fields:
        raise ConfigError(f"{path}: no column 'code' (not a sheet expert_eval.py action=sample wrote)")
    return fields, rows


def create_rating_app(
    sheet: Path,
    store: RatingStore,
    dims: Sequence[kit.Dimension],
    notice: str,
    allowed_hosts: Sequence[str] = (),
):
    """The rating page's app. `allowed_hosts` (host:port): the Host a request must name (a page elsewhere that
    rebinds its own name to this machine cannot read the posts); a change (save, export) also needs the session's
    token, which only this page reads, and an Origin, when sent, of this page."""
    import secrets

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from mentalglm.fileio.atomic import csv_text, write_atomic

    fields, rows = _sheet_rows(sheet)
    by_code = {r["code"]: r for r in rows}
    token = secrets.token_urlsafe(24)
    origins = {f"http://{h}" for h in allowed_hosts}
    app = FastAPI(title="MentalGLM expert rating", docs_url=None, redoc_url=None, openapi_url=None)
    # Ratings already in the sheet (a rater who began in a spreadsheet) seed the store, never overwrite it.
    stored = store.all()
    for r in rows:
        filled = {d.name: int(r[d.name]) for d in dims if (r.get(d.name) or "").strip().isdigit()}
        if filled and r["code"] not in stored:
            store.put(r["code"], filled | {kit.COMMENT: r.get(kit.COMMENT) or ""})

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if allowed_hosts and request.headers.get("host", "") not in allowed_hosts:
            return JSONResponse({"detail": "this page answers only under the address it was started on"}, 421)
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin is not None and allowed_hosts and origin not in origins:
                return JSONResponse({"detail": f"a change from another page ({origin}) is refused"}, 403)
            if not secrets.compare_digest(request.headers.get("x-rating-token", ""), token):
                return JSONResponse({"detail": "missing or stale session token: reload the page"}, 403)
        try:
            return await call_next(request)
        except sqlite3.OperationalError as e:
            log.warning("ratings database: %s", e)
            detail = (
                f"not saved: the ratings database ({store.path.name}) is locked or unavailable ({e}); close any "
                "program that has it open and save again"
            )
            return JSONResponse({"detail": detail}, 503)

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
        versioned = store.versioned()
        return {
            "rater": store.rater,
            "notice": notice,
            "token": token,
            "rubric": [{"name": d.name, "description": d.description, "min": d.low, "max": d.high} for d in dims],
            "items": [{k: r.get(k) or "" for k in ("code", "task", "aspect", "post", "answer")} for r in rows],
            "ratings": {code: data for code, (data, _) in versioned.items()},
            "versions": {code: version for code, (_, version) in versioned.items()},
        }

    @app.put("/api/ratings/{code}")
    def rate(code: str, body: dict):
        if code not in by_code:
            raise HTTPException(404, f"code {code!r} is not on this sheet")
        based_on = body.get("version")
        if isinstance(based_on, bool) or not isinstance(based_on, int):
            raise HTTPException(422, "version: the version of the ratings this change was made on (from /api/sheet)")
        data = {}
        for d in dims:
            value = body.get(d.name)
            if value is None:  # not rated here: the stored rating stays
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not d.accepts(value):
                raise HTTPException(422, f"{d.name} must be a whole number from {d.low} to {d.high}")
            data[d.name] = value
        if kit.COMMENT in body:
            if not isinstance(body[kit.COMMENT], str):
                raise HTTPException(422, "comment must be text")
            data[kit.COMMENT] = body[kit.COMMENT]
        try:
            version = store.put(code, data, based_on)
        except Conflict as e:
            detail = (
                "not saved: this answer's ratings were changed elsewhere (another tab or window) since this page "
                "loaded them; the stored ratings are shown now"
            )
            return JSONResponse({"detail": detail, "stored": e.stored, "version": e.version}, 409)
        ratings = store.all()
        return {
            "rated": sum(complete(v) for v in ratings.values()),
            "total": len(rows),
            "version": version,
            "stored": ratings[code],
        }

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


def served_hosts(host: str, port: int) -> list[str]:
    """The Host values of this page: the address it listens on, and loopback's names when that is loopback."""
    if host in ("0.0.0.0", "::", ""):  # every interface: its names are not known here, so Host is not checked
        return []
    names = {host}
    if is_loopback_host(host):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    return sorted(f"{name}:{port}" for name in names)


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
    hosts = served_hosts(str(cfg.host), int(cfg.port))
    app = create_rating_app(sheet, RatingStore(run / DATABASE, str(cfg.rater)), dims, NOTICE, hosts)
    if not is_loopback_host(str(cfg.host)):
        log.warning("host=%s: the posts on this sheet are served beyond this machine", cfg.host)
    log.info("rating page for %s on http://%s:%d/ (progress in %s)", cfg.rater, cfg.host, cfg.port, run / DATABASE)
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_config=None, access_log=False)
