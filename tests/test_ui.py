"""The "Syncs" pages inside Airflow's UI, in a real browser: Airflow's api-server on loopback
(a migrated SQLite metadata DB, the simple auth manager's users), Debian's Chromium driven by
Playwright, and sync data from real runs against the DFINERY emulator (one through Airflow's
dag.test, one dry run from the CLI).

Deselect with ``-m "not ui"``. ``USERSYNC_UI_SCREENSHOTS=docs`` writes the README's screenshots.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import sqlalchemy as sa

from airflow_helpers import BIN, airflow_env, make_home
from vendor_cases.dfinery import DFINERY_MAPPING, dfinery_sync
from warehouse import make_users, table, user_row, write_config
from connector import state
from connector.vendors import emulator

pytestmark = pytest.mark.ui
HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
# headless, and nothing that reaches out of the machine (updates, sync, QUIC probes)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = os.environ.get("USERSYNC_UI_SCREENSHOTS")
TOKEN = "tok-secret-ui-4711"  # the vendor credential: known to every process here, shown by none
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
PASSWORDS = {"admin": "admin-pw-1", "viewer": "viewer-pw-2", "nobody": "nobody-pw-3"}
NAME = "ui_users"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Site:
    def __init__(self, url: str, state_url: str, env: dict, log: Path):
        self.url, self.state_url, self.env, self.log = url, state_url, env, log

    def token(self, user: str) -> str:
        r = requests.post(f"{self.url}/auth/token", json={"username": user, "password": PASSWORDS[user]}, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["access_token"]

    def get(self, path: str, user: str | None = None, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token(user)}"} if user else {}
        return requests.get(self.url + path, headers=headers, timeout=30, **kw)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from connector.vendors.dfinery import emulator as dfinery

    tmp = tmp_path_factory.mktemp("ui")
    warehouse = f"sqlite:///{tmp / 'warehouse.db'}"
    rows = [user_row(i, note=None) for i in range(12)]
    rows[3]["note"] = XSS  # the vendor refuses a text 'note' (registered as a number) and quotes it back
    rows[5].update(user_id="=1+2", note="five")  # a user key a spreadsheet would run as a formula
    rows[8]["note"] = "eight"
    rows[7]["interests"] = "not a JSON list"  # set aside while mapping: class 'invalid'
    make_users(warehouse, rows).dispose()
    mapping = [*DFINERY_MAPPING, {"column": "note", "attribute": "note", "type": "String"}]
    emu = dfinery.Emulator(service_id="svc-1", access_token=TOKEN,
                           properties={**{m["attribute"]: m["type"] for m in DFINERY_MAPPING}, "note": "Long"})
    running = emulator.Running(emu)
    running.__enter__()
    cfg = write_config(tmp / "syncs.yaml", warehouse, [
        dfinery_sync(running.url, name=NAME, mapping=mapping, shards=2, max_failure_fraction=0.5, schedule="0 3 * * *")])
    home = make_home()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (home / "passwords.json").write_text(json.dumps(PASSWORDS))
    env = {**os.environ, **airflow_env(home), "USERSYNC_CONFIG": str(cfg), "TEST_DFINERY_TOKEN": TOKEN,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port), "AIRFLOW__API__BASE_URL": url,
           "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(32).hex(),  # 64 bytes, as HS512 wants
           # the simple auth manager's roles; 'nobody' has none, so no permission at all
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer,nobody:",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json")}
    # the api-server starts while the runs make the data (its pages read the tables per request)
    log = tmp / "api-server.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1", "--apps", "core"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # a run through Airflow (scheduler's path: plan -> push per shard -> finalize), then a dry run from the CLI
        dag_test = subprocess.run([sys.executable, str(HERE / "airflow_helpers.py"), f"usersync__{NAME}",
                                   "2026-01-02T00:00:00"], env=env, capture_output=True, text=True, timeout=300)
        assert dag_test.returncode == 0, dag_test.stdout[-3000:] + dag_test.stderr[-3000:]
        dry = subprocess.run([str(BIN / "usersync"), "run", NAME, "--dry-run", "--full-refresh", "--config", str(cfg)],
                             env=env, capture_output=True, text=True, timeout=120)
        assert dry.returncode == 0, dry.stderr
        deadline = time.monotonic() + 180  # readiness, not a timing assertion
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(f"{url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "api-server not up: " + log.read_text()[-3000:]
            time.sleep(1)
        yield Site(url, warehouse, env, log)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        running.__exit__(None, None, None)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: apt-get install chromium (.ci/run does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def runs_of(site: Site) -> list[dict]:
    return sorted(table(site.state_url, state.runs), key=lambda r: r["run_id"])


def failures_of(site: Site, run_id: int) -> list[dict]:
    return table(site.state_url, state.failures, state.failures.c.run_id == run_id)


def shot(page, name: str, full: bool = False) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / name), full_page=full)


def test_syncs_pages_in_airflow_ui(site, browser, tmp_path):
    ctx = browser.new_context(viewport={"width": 1360, "height": 820}, accept_downloads=True)
    ctx.set_default_timeout(90_000)  # a loaded machine: waits are bounded readiness, not timing checks
    page = ctx.new_page()
    try:
        browse(site, ctx, page)
    except BaseException:
        page.screenshot(path=str(tmp_path / "failure.png"))  # what the browser showed, for the report
        print(f"failure screenshot: {tmp_path / 'failure.png'}; api-server log: {site.log}")
        raise
    finally:
        ctx.close()


def browse(site: Site, ctx, page) -> None:
    airflow_run, dry_run = runs_of(site)
    assert (airflow_run["status"], airflow_run["trigger"][:16], dry_run["mode"]) == ("partial", "airflow:manual__", "dry_run")
    fails = {f["user_key"]: f for f in failures_of(site, airflow_run["run_id"])}
    assert {k: f["error_class"] for k, f in fails.items()} == {
        "u00003": "rejected", "=1+2": "rejected", "u00008": "rejected", "u00007": "invalid"}

    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    seen: list[str] = []  # every page, CSV and API answer a user got: none holds a secret

    # a page asked for without a login goes to Airflow's login, and comes back after it
    page.goto(f"{site.url}/usersync/")
    assert "/auth/login" in page.url
    page.get_by_label(re.compile("username", re.I)).fill("viewer")
    page.get_by_label(re.compile("password", re.I)).fill(PASSWORDS["viewer"])
    page.get_by_role("button", name=re.compile("sign in|log in|login", re.I)).click()
    page.wait_for_url(re.compile(r"/usersync/$"))
    assert page.locator("#syncs tr[data-sync]").count() == 1

    # from Airflow's own navigation: the "Syncs" entry shows the list in Airflow's frame
    page.goto(f"{site.url}/")
    page.get_by_role("link", name="Syncs").click()
    frame = page.frame_locator("iframe")
    row = frame.locator(f"#syncs tr[data-sync='{NAME}']")
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[1:3] == ["dfinery", "0 3 * * *"]
    assert f"#{dry_run['run_id']}" in cells[3] and "dry_run" in cells[3]
    assert cells[10] == str(len(table(site.state_url, state.snapshot))) and cells[11] == "4"
    shot(page, "ui-syncs.png")

    # the sync, then its Airflow run (the one with rejections)
    row.get_by_role("link", name=NAME).click()
    run_row = frame.locator(f"#runs tr[data-run='{airflow_run['run_id']}']")
    run_row.wait_for()
    texts = run_row.locator("td").all_inner_texts()
    assert texts[1:4] == ["partial", "incremental", "manual"]
    assert [t.replace(",", "") for t in texts[6:12]] == [str(airflow_run[k]) for k in (
        "users_read", "users_changed", "users_delivered", "users_rejected", "users_failed", "requests")]
    assert frame.locator(f"#runs tr[data-run='{dry_run['run_id']}'] td").nth(3).inner_text() == "cli"
    run_row.get_by_role("link", name=f"#{airflow_run['run_id']}").click()

    # the vendor's code and message for a rejected user; the <script> in it is text, never run
    failing = frame.locator("#failures tr[data-user='u00003'] td")
    failing.first.wait_for()
    got = failing.all_inner_texts()
    assert got[1:4] == ["(user)", "rejected", "40001"]  # the user as a whole, not one set-aside attribute
    assert got[4] == fails["u00003"]["message"] and "<script>" in got[4] and "expects long" in got[4]
    assert frame.locator("#failures script, #failures img").count() == 0
    batches = frame.locator("#batches tr").all_inner_texts()
    assert any("40001" in b and "<script>" in b and "rejected" in b for b in batches)
    assert len(batches) - 1 == len(table(site.state_url, state.batches, state.batches.c.run_id == airflow_run["run_id"]))
    shot(page, "ui-run.png")

    # filter by class: only the invalid user
    frame.locator("#class").select_option("invalid")
    frame.locator("#filter").click()
    frame.locator("#failures-title", has_text="matching").wait_for()
    assert frame.locator("#failures tr[data-user]").evaluate_all("rs => rs.map(r => r.dataset.user)") == ["u00007"]

    # the CSV of the filtered list, then of all: the rows of sync_failures, formulas quoted
    for cls in ("invalid", ""):
        if not cls:
            frame.locator("#class").select_option("")
            frame.locator("#filter").click()
            frame.locator("#failures-title:not(:has-text('matching'))").wait_for()
        with page.expect_download() as d:
            frame.locator("#csv").click()
        text = Path(d.value.path()).read_text()
        seen.append(text)
        got = list(csv.DictReader(io.StringIO(text)))
        want = sorted((f for f in fails.values() if not cls or f["error_class"] == cls), key=lambda f: f["user_key"])
        assert [r["user_key"] for r in got] == [("'" + f["user_key"]) if f["user_key"].startswith("=") else f["user_key"]
                                                for f in want]
        for r, f in zip(got, want):
            assert (r["error_class"], r["code"], r["message"], int(r["attempts"])) == (
                f["error_class"], f["code"] or "", f["message"], f["attempts"])
            assert r["first_seen"].startswith(f["first_seen"].strftime("%Y-%m-%d %H:%M:%S"))

    # the dry run's plan: changes per attribute, as staged
    plan_rows = table(site.state_url, state.plan, state.plan.c.run_id == dry_run["run_id"])
    assert plan_rows, "a dry run keeps its plan rows"
    per_attr: dict[str, int] = {}
    for p in plan_rows:
        for attr, *_ in json.loads(p["ops"]):
            per_attr[attr] = per_attr.get(attr, 0) + 1
    page.goto(f"{site.url}/usersync/syncs/{NAME}/runs/{dry_run['run_id']}")
    shown = dict(tuple(r.split("\t")) for r in page.locator("#plan tr").all_inner_texts()[1:])
    assert {a: int(n) for a, n in shown.items()} == per_attr
    assert page.locator("#samples tr").count() > 1
    seen.append(page.content())
    shot(page, "ui-plan.png", full=True)

    # the "Sync run" tab of Airflow's page of that DAG run shows the same run
    dag_run_id = airflow_run["trigger"].removeprefix("airflow:")
    page.goto(f"{site.url}/dags/usersync__{NAME}/runs/{quote(dag_run_id, safe='')}")
    page.get_by_role("link", name="Sync run").click()
    frame = page.frame_locator("iframe")
    frame.locator("#failures tr[data-user='u00003']").wait_for()
    assert frame.locator("h1").inner_text().startswith(f"{NAME} · run #{airflow_run['run_id']}")
    shot(page, "ui-dag-run-tab.png")
    page.goto(f"{site.url}/usersync/dags/usersync__{NAME}/runs/{quote(dag_run_id, safe='')}")
    assert page.url.endswith(f"/usersync/syncs/{NAME}/runs/{airflow_run['run_id']}")
    seen.append(page.content())
    for path in (f"/usersync/api/syncs", f"/usersync/api/syncs/{NAME}/runs",
                 f"/usersync/api/syncs/{NAME}/runs/{airflow_run['run_id']}"):
        r = ctx.request.get(site.url + path)
        assert r.status == 200
        seen.append(r.text())
    assert dialogs == [] and page.evaluate("window.__pwned") is None

    cookies = [c["value"] for c in ctx.cookies() if c["name"] == "_token"]
    assert cookies
    haystack = "\n".join(seen)
    for secret in (TOKEN, *cookies, *PASSWORDS.values(), "usersig="):
        assert secret not in haystack


def test_anonymous_and_unauthorized_requests_are_refused(site):
    path = f"/usersync/api/syncs/{NAME}/runs"
    # anonymous, or a token Airflow did not sign: 401 and nothing else
    for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, {"Cookie": "_token=eyJhbGciOiJIUzUxMiJ9.e30.x"}):
        r = requests.get(site.url + path, headers=headers, timeout=30)
        assert (r.status_code, r.json()) == (401, {"detail": "Not authenticated"})
        r = requests.get(f"{site.url}/usersync/syncs/{NAME}/runs/1/failures.csv", headers=headers, timeout=30,
                         allow_redirects=False)
        assert r.status_code == 303 and "/auth/login" in r.headers["location"] and NAME not in r.text
    # a user the auth manager lets read no DAG: an empty list, and 403 for the sync itself
    assert site.get("/usersync/api/syncs", "nobody").json() == []
    for p in (path, f"/usersync/syncs/{NAME}", f"/usersync/syncs/{NAME}/runs/1/failures.csv", "/usersync/api/syncs/x/runs"):
        r = site.get(p, "nobody", allow_redirects=False)
        assert r.status_code == 403 and "u0000" not in r.text, p
    # a viewer may read it; a run id of another sync (or none) is not found through this sync
    r = site.get(path, "viewer")
    assert r.status_code == 200 and [x["run_id"] for x in r.json()["runs"]] == [2, 1]
    assert site.get(f"/usersync/api/syncs/{NAME}/runs/99", "viewer").status_code == 404
    assert site.get("/usersync/api/syncs/not_a_sync/runs", "viewer").status_code == 404
