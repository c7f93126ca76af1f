"""The "Syncs" pages and their JSON API: a FastAPI app that Airflow's api-server mounts at
``/usersync`` (``connector.airflow.plugin``), reading the state database(s) of the syncs in
``USERSYNC_CONFIG`` through ``connector.report`` (the queries ``usersync status`` runs).

Airflow does not guard a plugin's app: every route here asks Airflow itself. The user is
resolved from the JWT (``Authorization: Bearer`` or the UI's ``_token`` cookie) by
``airflow.api_fastapi.core_api.security.get_user``, the dependency of Airflow's own API, and
each sync is shown only to a user the auth manager lets read its DAG
(``is_authorized_dag(method="GET", details=DagDetails(id, team_name))``, as Airflow's
``requires_access_dag`` asks). Anonymous: 401 from the API, a redirect to the login page
for a page, and nothing else. The all-syncs list holds only the syncs a user may read.

What is shown comes from the sync tables (which hold no credential) and a sync's name,
vendor type and schedule; a sync's vendor settings and credentials are never read here.
Templates are autoescaped; CSV cells that a spreadsheet would run as a formula are quoted.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import logging
import math
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from connector import config, report, state
from connector.airflow.dags import PREFIX, config_path, dag_id
from connector.airflow.links import URL_PREFIX  # noqa: F401 - where connector.airflow.plugin mounts this app

log = logging.getLogger("usersync.airflow")
RUNS_PAGE, BATCHES_PAGE, FAILURES_PAGE = 25, 50, 50


# -- what is configured ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SyncInfo:
    """What a page may say about a sync (no vendor settings, no credentials)."""

    name: str
    vendor: str
    schedule: str | None
    dag_id: str


class Catalog:
    """The syncs of the config file, re-read when it changes; one engine per state database."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: tuple[Path, float] | None = None
        self._syncs: dict[str, SyncInfo] = {}
        self._state_urls: dict[str, str] = {}  # by sync: a URL may hold a password, so no page gets it
        self._engines: dict[str, Any] = {}

    def syncs(self) -> dict[str, SyncInfo]:
        path = config_path()
        try:
            stamp = (path, path.stat().st_mtime)
        except OSError:
            return {}
        with self._lock:
            if stamp != self._seen:
                try:
                    cfg, _ = config.load(path, strict=False)
                except config.ConfigError as e:  # shown in the DAGs' import errors; nothing to list
                    log.warning("usersync UI: %s", e)
                    cfg = None
                specs = [] if cfg is None else cfg.syncs
                self._syncs = {s.name: SyncInfo(s.name, s.vendor.type, s.schedule, dag_id(s.name)) for s in specs}
                self._state_urls = {s.name: cfg.state_url for s in specs}
                self._seen = stamp
            return dict(self._syncs)

    def engine(self, sync: SyncInfo):
        with self._lock:
            url = self._state_urls[sync.name]
            if url not in self._engines:
                self._engines[url] = state.make_engine(url)
            return self._engines[url]


CATALOG = Catalog()


# -- who asks ---------------------------------------------------------------------------------
async def current_user(request: Request):
    """The Airflow user of this request, resolved as Airflow's API resolves it; None when the
    request carries no valid token (absent, expired or forged alike)."""
    from fastapi import HTTPException
    from fastapi.security.utils import get_authorization_scheme_param
    from fastapi.security import HTTPAuthorizationCredentials

    from airflow.api_fastapi.core_api.security import get_user

    scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
    bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if scheme and token else None
    try:
        return await get_user(request, None, bearer)
    except HTTPException:
        return None


def may_read(user, sync: SyncInfo) -> bool:
    """Whether Airflow's auth manager lets this user read the sync's DAG."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
    from airflow.models.dag import DagModel

    details = DagDetails(id=sync.dag_id, team_name=DagModel.get_team_name(sync.dag_id))
    return bool(get_auth_manager().is_authorized_dag(method="GET", details=details, user=user))


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def readable_sync(user, name: str) -> SyncInfo:
    """The sync, if this user may read it. An unknown sync and a forbidden one answer alike
    (404 vs 403 only after the check), so names are not probed past the auth manager."""
    sync = CATALOG.syncs().get(name)
    probe = sync or SyncInfo(name, "", None, dag_id(name))
    if not may_read(user, probe):
        raise Refused(403, f"you may not read the DAG {probe.dag_id}")
    if sync is None:
        raise Refused(404, f"no sync {name!r} in {config_path()}")
    return sync


# -- rendering (pure: tests/test_secrets.py renders every page of its cases) ----------------
def _ts(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("connector.airflow", "templates"),
                               autoescape=True, undefined=jinja2.StrictUndefined)
TEMPLATES.filters.update(ts=_ts, num=_num, tojson_text=_dumps)


def render(template: str, **context: Any) -> str:
    return TEMPLATES.get_template(template).render(**context)


def _pages(total: int, page: int, size: int) -> dict[str, int]:
    return {"page": page, "pages": max(1, math.ceil(total / size)), "total": total, "size": size}


def syncs_context(user, syncs: list[SyncInfo]) -> dict[str, Any]:
    rows = []
    for s in syncs:
        eng = CATALOG.engine(s)
        rows.append({"sync": s, **report.overview(eng, s.name)})
    return {"rows": rows, "config": str(config_path())}


def sync_context(sync: SyncInfo, page: int) -> dict[str, Any]:
    eng = CATALOG.engine(sync)
    if not report.has_tables(eng):
        return {"sync": sync, "runs": [], "paging": _pages(0, 1, RUNS_PAGE), **report.overview(eng, sync.name)}
    total = report.count_runs(eng, sync.name)
    runs = report.recent_runs(eng, sync.name, limit=RUNS_PAGE, offset=(page - 1) * RUNS_PAGE)
    return {"sync": sync, "runs": runs, "paging": _pages(total, page, RUNS_PAGE), **report.overview(eng, sync.name)}


def run_context(sync: SyncInfo, run_id: int, *, bpage: int = 1, fpage: int = 1, error_class: str | None = None,
                code: str | None = None) -> dict[str, Any] | None:
    eng = CATALOG.engine(sync)
    run = report.get_run(eng, sync.name, run_id) if report.has_tables(eng) else None
    if run is None:
        return None
    columns, batches = report.batches(eng, sync.name, run_id, limit=BATCHES_PAGE, offset=(bpage - 1) * BATCHES_PAGE)
    nb = report.count_batches(eng, sync.name, run_id)
    nf = report.count_failures(eng, sync.name, run_id, error_class=error_class, code=code)
    fails = report.failures(eng, sync.name, run_id, error_class=error_class, code=code, limit=FAILURES_PAGE,
                            offset=(fpage - 1) * FAILURES_PAGE)
    plan = report.dry_run_plan(eng, run_id) if run["mode"] == "dry_run" else None
    return {"sync": sync, "run": run, "batch_columns": columns, "batches": batches,
            "batch_paging": _pages(nb, bpage, BATCHES_PAGE), "failures": fails,
            "failure_paging": _pages(nf, fpage, FAILURES_PAGE), "filters": report.failure_codes(eng, sync.name, run_id),
            "error_class": error_class or "", "code": code or "", "plan": plan,
            "outcomes": report.batch_outcomes(eng, run_id)}


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """A CSV cell; text a spreadsheet would evaluate (=, +, -, @ first) is quoted with a '."""
    text = _ts(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def failures_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(report.FAILURE_COLUMNS)
    for r in rows:
        w.writerow([csv_cell(r[c]) for c in report.FAILURE_COLUMNS])
    return out.getvalue()


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, SyncInfo):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).isoformat()
    return value


# -- the app ------------------------------------------------------------------------------------
def _int(value: str | None, default: int = 1) -> int:
    try:
        return max(int(value or default), 1)
    except ValueError:
        return default


def make_app() -> FastAPI:
    app = FastAPI(title="usersync", docs_url=None, redoc_url=None, openapi_url=None)

    def base(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def is_api(request: Request) -> bool:
        path, root = request.url.path, base(request)
        return (path[len(root):] if path.startswith(root) else path).startswith("/api/")

    def page(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
        html = render(template, base=base(request), query=request.query_params, **context)
        return HTMLResponse(html, status_code=status, headers=NO_STORE)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        """No route answers before the user is known: 401 (API) or the login page (pages)."""
        user = await current_user(request)
        if user is None:
            if is_api(request):
                return JSONResponse({"detail": "Not authenticated"}, status_code=401, headers=NO_STORE)
            from airflow.api_fastapi.app import get_auth_manager

            login = get_auth_manager().get_url_login(next_url=str(request.url))
            return RedirectResponse(login, status_code=303, headers=NO_STORE)
        request.state.usersync_user = user
        return await call_next(request)

    @app.exception_handler(Refused)
    def refused(request: Request, e: Refused):  # raised by a sync route before anything is read
        if is_api(request):
            return JSONResponse({"detail": e.message}, status_code=e.status, headers=NO_STORE)
        return page(request, "refused.html", status=e.status, message=e.message)

    def user_of(request: Request):
        return request.state.usersync_user

    # pages
    @app.get("/", response_class=HTMLResponse)
    def all_syncs(request: Request, user=Depends(user_of)):
        syncs = [s for s in CATALOG.syncs().values() if may_read(user, s)]
        return page(request, "syncs.html", **syncs_context(user, syncs))

    @app.get("/syncs/{name}", response_class=HTMLResponse)
    def one_sync(request: Request, name: str, user=Depends(user_of)):
        sync = readable_sync(user, name)
        return page(request, "sync.html", **sync_context(sync, _int(request.query_params.get("page"))))

    @app.get("/syncs/{name}/runs/{run_id}", response_class=HTMLResponse)
    def one_run(request: Request, name: str, run_id: int, user=Depends(user_of)):
        sync = readable_sync(user, name)
        q = request.query_params
        ctx = run_context(sync, run_id, bpage=_int(q.get("bpage")), fpage=_int(q.get("fpage")),
                          error_class=q.get("class") or None, code=q.get("code") or None)
        if ctx is None:
            raise Refused(404, f"sync {name} has no run {run_id}")
        return page(request, "run.html", **ctx)

    @app.get("/syncs/{name}/runs/{run_id}/failures.csv")
    def failures_download(request: Request, name: str, run_id: int, user=Depends(user_of)):
        sync = readable_sync(user, name)
        eng = CATALOG.engine(sync)
        if not report.has_tables(eng) or report.get_run(eng, sync.name, run_id) is None:
            raise Refused(404, f"sync {name} has no run {run_id}")
        q = request.query_params
        rows = report.failures(eng, sync.name, run_id, error_class=q.get("class") or None,
                               code=q.get("code") or None, limit=None)
        filename = f"{sync.name}-run{run_id}-failures.csv"
        return Response(failures_csv(rows), media_type="text/csv; charset=utf-8",
                        headers={**NO_STORE, "Content-Disposition": f'attachment; filename="{filename}"'})

    # where Airflow's DAG, DAG run and task instance tabs point (connector.airflow.plugin)
    @app.get("/dags/{dag}")
    def from_dag(request: Request, dag: str, user=Depends(user_of)):
        sync = readable_sync(user, _sync_of(dag))
        return RedirectResponse(f"{base(request)}/syncs/{sync.name}", status_code=303)

    @app.get("/dags/{dag}/runs/{dag_run_id}")
    def from_dag_run(request: Request, dag: str, dag_run_id: str, user=Depends(user_of)):
        sync = readable_sync(user, _sync_of(dag))
        eng = CATALOG.engine(sync)
        run_id = report.run_of_dag_run(eng, sync.name, dag_run_id) if report.has_tables(eng) else None
        if run_id is None:
            raise Refused(404, f"DAG run {dag_run_id} has recorded no sync run (yet)")
        return RedirectResponse(f"{base(request)}/syncs/{sync.name}/runs/{run_id}", status_code=303)

    # JSON
    @app.get("/api/syncs")
    def api_syncs(user=Depends(user_of)):
        syncs = [s for s in CATALOG.syncs().values() if may_read(user, s)]
        return JSONResponse(jsonable(syncs_context(user, syncs)["rows"]), headers=NO_STORE)

    @app.get("/api/syncs/{name}/runs")
    def api_runs(request: Request, name: str, user=Depends(user_of)):
        sync = readable_sync(user, name)
        ctx = sync_context(sync, _int(request.query_params.get("page")))
        return JSONResponse(jsonable({"runs": ctx["runs"], "paging": ctx["paging"]}), headers=NO_STORE)

    @app.get("/api/syncs/{name}/runs/{run_id}")
    def api_run(request: Request, name: str, run_id: int, user=Depends(user_of)):
        sync = readable_sync(user, name)
        q = request.query_params
        ctx = run_context(sync, run_id, bpage=_int(q.get("bpage")), fpage=_int(q.get("fpage")),
                          error_class=q.get("class") or None, code=q.get("code") or None)
        if ctx is None:
            raise Refused(404, f"sync {name} has no run {run_id}")
        keys = ("run", "batches", "batch_paging", "failures", "failure_paging", "filters", "plan")
        return JSONResponse(jsonable({k: ctx[k] for k in keys}), headers=NO_STORE)

    return app


NO_STORE = {"Cache-Control": "no-store"}  # pages differ by user: never from a shared cache


def _sync_of(dag: str) -> str:
    if not dag.startswith(PREFIX):
        raise Refused(404, f"{dag} is not a usersync DAG")
    return dag[len(PREFIX):]


def qs(params, **changes) -> str:
    """The current query string with some parameters changed (None drops one)."""
    merged = {k: v for k, v in params.items()}
    merged.update(changes)
    return urlencode({k: v for k, v in merged.items() if v not in (None, "")})


TEMPLATES.globals.update(qs=qs)
