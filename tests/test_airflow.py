"""Airflow 3 integration: the real DAG folder, dag.test() against the vendor emulators over
loopback HTTP, real warehouses and a temporary AIRFLOW_HOME with a SQLite metadata database."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_helpers import BIN, DAGS, airflow_env, clone_home, make_home, run_existing, sync_dags_to_db
from vendor_cases.dfinery import DFINERY_MAPPING, dfinery_sync
from warehouse import T0, make_users, table, update_users, user_row, write_config
from connector import engine, config, state
from connector.vendors import emulator

N = 24
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def airflow_home():
    """One migrated metadata DB for this module; Airflow reads its settings at first import. The
    environment is restored after the module, so that its settings (a WARNING log level, quick lock
    retries) do not reach the Airflow deployments other modules start."""
    assert "airflow.configuration" not in sys.modules, (
        "airflow was imported before this session's AIRFLOW_HOME was set (at collection?): its settings "
        "point at the default home, whose database has no tables")
    home = make_home()
    saved = {k: os.environ.get(k) for k in airflow_env(home)}
    os.environ.update(airflow_env(home))
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(home, ignore_errors=True)


def load_dags(cfg: Path, monkeypatch) -> tuple[dict, dict]:
    """Parse the real DAG folder with USERSYNC_CONFIG pointing at ``cfg``: (dags, import errors)."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("USERSYNC_CONFIG", str(cfg))
    bag = DagBag(dag_folder=str(DAGS))
    return bag.dags, bag.import_errors


def states(dr) -> dict[str, str]:
    return {f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id: str(ti.state)
            for ti in dr.get_task_instances()}


def dfinery_profile(row: dict) -> dict:
    """A warehouse row as DFINERY should hold it (written out independently of the engine)."""
    signup = row["signup_at"]
    return {"membership": row["plan"], "ltv": float(row["ltv"]), "orders": row["orders"],
            "subscribed": row["subscribed"], "signup_at": signup.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "birthday": row["birthday"].isoformat(), "interests": json.loads(row["interests"])}


@pytest.fixture
def dfinery_emu(monkeypatch):
    from connector.vendors.dfinery import emulator as dfinery

    emu = dfinery.Emulator(service_id="svc-1", access_token="tok-secret-123",
                           properties={m["attribute"]: m["type"] for m in DFINERY_MAPPING})
    with emulator.Running(emu) as running:
        yield running


def conn_sync(url: str, **over) -> dict:
    """The DFINERY test sync with its credentials from an Airflow connection."""
    sync = dfinery_sync(url, **over)
    sync["vendor"] = {"type": "dfinery", "conn_id": "dfinery_test", "backoff": 0.01, **over.get("vendor", {})}
    return sync


def conn_env(monkeypatch, url: str) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DFINERY_TEST", json.dumps(
        {"conn_type": "usersync_dfinery", "login": "svc-1", "password": "tok-secret-123", "extra": {"base_url": url}}))


# -- parsing -------------------------------------------------------------------------------------
def test_dag_folder_has_one_dag_per_sync_and_a_broken_sync_only_breaks_its_own(airflow_home, tmp_path,
                                                                                   monkeypatch, dfinery_emu):
    warehouse = tmp_path / "never-created.db"
    monkeypatch.setenv("TEST_DFINERY_TOKEN", "tok-secret-123")
    monkeypatch.setenv("TEST_JIGUANG_SECRET", "s3cret")
    cfg = write_config(tmp_path / "syncs.yaml", f"sqlite:///{warehouse}", [
        dfinery_sync(dfinery_emu.url, schedule="0 3 * * *", tags=["crm"], shards=3),
        {"name": "jiguang_users", "source": {"table": "users"}, "identity": {"cuid": "numeric_id"},
         "vendor": {"type": "jiguang", "conn_id": "jg_prod"},
         "mapping": [{"column": "plan", "attribute": "membership", "type": "String"}]},
        dfinery_sync(dfinery_emu.url, name="broken_one", mapping=[{"column": "plan", "attribute": "x", "type": "Nope"}]),
    ])
    dags, errors = load_dags(cfg, monkeypatch)
    assert errors == {}
    assert sorted(dags) == ["usersync__broken_one", "usersync__dfinery_users", "usersync__jiguang_users"]
    # parsing read the YAML and nothing else: no database was opened, no request was sent
    assert not warehouse.exists() and dfinery_emu.emulator.log == []

    d = dags["usersync__dfinery_users"]
    assert type(d.timetable).__name__ == "CronDataIntervalTimetable" and d.timetable.expression == "0 3 * * *"
    assert set(d.tags) == {"usersync", "dfinery", "crm"} and d.max_active_runs == 1 and not d.catchup
    for m in DFINERY_MAPPING:
        assert f"| `{m['column']}` | `{m['attribute']}` | {m['type']} |" in d.doc_md
    assert set(d.params.keys()) == {"mode", "window_start", "window_end", "user_ids", "dry_run", "allow_large_change"}
    assert [t.task_id for t in d.topological_sort()][:1] == ["plan"] and "finalize" in d.task_dict
    assert d.task_dict["finalize"].trigger_rule == "all_done"
    assert d.task_dict["push"].pool.startswith("usersync_dfinery__")
    jg = dags["usersync__jiguang_users"]
    assert jg.task_dict["push"].pool == "usersync_jiguang__jg_prod"
    assert type(jg.timetable).__name__ == "CronDataIntervalTimetable"  # nightly by default

    broken = dags["usersync__broken_one"]
    assert "config-error" in broken.tags and list(broken.task_dict) == ["config_error"]
    assert "mapping[0].type" in broken.doc_md and "'Nope' is not a dfinery type" in broken.doc_md

    # a file that is not YAML at all is the file's import error (there is no sync to show)
    cfg.write_text("warehouse: [unclosed")
    dags, errors = load_dags(cfg, monkeypatch)
    assert dags == {} and "malformed YAML" in next(iter(errors.values()))


def test_provider_info_declares_a_connection_type_per_vendor(airflow_home):
    import jsonschema
    from airflow.providers_manager import ProvidersManager

    from connector.airflow import provider

    info = provider.get_provider_info()
    schema = json.loads((Path(sys.modules["jsonschema"].__file__).parents[1] / "airflow" /
                         "provider_info.schema.json").read_text())
    jsonschema.validate(info, schema)
    types = {c["connection-type"]: c for c in info["connection-types"]}
    d = types["usersync_dfinery"]
    assert d["ui-field-behaviour"]["relabeling"] == {"login": "Service id", "password": "Access token"}
    assert "host" in d["ui-field-behaviour"]["hidden-fields"] and "base_url" in d["conn-fields"]
    m = types.get("usersync_moengage")
    if m:  # a secret kept in extra is marked sensitive; a setting is not
        assert m["conn-fields"]["data_center"]["schema"].get("format") != "password"
    import importlib

    for c in info["connection-types"]:
        module, cls = c["hook-class-name"].rsplit(".", 1)
        hook = getattr(importlib.import_module(module), cls)
        assert hook.conn_type == c["connection-type"]
    # installed: Airflow finds the provider through the entry point and builds the forms from it
    pm = ProvidersManager()
    assert "usersync" in pm.providers
    assert pm.field_behaviours["usersync_dfinery"]["relabeling"] == {"login": "Service id", "password": "Access token"}
    assert "extra__usersync_dfinery__base_url" in pm.connection_form_widgets


# -- runs ----------------------------------------------------------------------------------------
def test_dag_test_end_to_end_dfinery(airflow_home, db_url, tmp_path, monkeypatch, dfinery_emu):
    rows = [user_row(i) for i in range(N)]
    make_users(db_url, rows)
    conn_env(monkeypatch, dfinery_emu.url)
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [conn_sync("unused")])
    dags, _ = load_dags(cfg, monkeypatch)
    dr = dags["usersync__dfinery_users"].test()
    assert dr.state == "success", states(dr)
    assert dfinery_emu.emulator.state() == {r["user_id"]: dfinery_profile(r) for r in rows}
    s = states(dr)
    assert sum(k.startswith("push[") for k in s) == 4 and set(s.values()) == {"success"}
    runs = table(db_url, state.runs)
    assert [(r["status"], r["users_delivered"], r["trigger"][:16]) for r in runs] == [
        ("success", N, "airflow:manual__")]
    assert {b["shard"] for b in table(db_url, state.batches)} == {0, 1, 2, 3}
    assert table(db_url, state.plan) == [] and table(db_url, state.locks) == []

    update_users(db_url, {"u00003": {"plan": "gold", "updated_at": T0 + dt.timedelta(hours=1)}})
    sent = len(dfinery_emu.emulator.log)
    dr = dags["usersync__dfinery_users"].test(logical_date=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc))
    assert dr.state == "success", states(dr)
    new = dfinery_emu.emulator.log[sent:]
    assert [(r["body"]["identity"]["external_id"], r["body"]["user_properties"]) for r in new] == [
        ("u00003", {"membership": "gold"})]


JG_MAPPING = [
    {"column": "plan", "attribute": "membership", "type": "String"},
    {"column": "orders", "attribute": "orders", "type": "Long"},
    {"column": "points", "attribute": "points", "type": "Long", "rule": "accumulate"},
]


def test_dag_test_end_to_end_jiguang_with_a_connection_in_the_metadata_db(airflow_home, sqlite_url, tmp_path,
                                                                          monkeypatch):
    from airflow.models import Connection
    from airflow.utils.session import create_session

    from connector.vendors.jiguang import emulator as jiguang

    rows = [user_row(i) for i in range(N)]
    make_users(sqlite_url, rows)
    emu = jiguang.Emulator(project_id="proj-7", project_secret="jg-secret-9",
                           attributes={m["attribute"]: {"type": m["type"], "rule": m.get("rule", "overwrite")}
                                       for m in JG_MAPPING})
    with emulator.Running(emu) as running, create_session() as session:
        session.query(Connection).filter(Connection.conn_id == "jg_test").delete()
        session.add(Connection(conn_id="jg_test", conn_type="usersync_jiguang", login="proj-7",
                               password="jg-secret-9", extra=json.dumps({"base_url": running.url})))
        session.commit()
        cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [{
            "name": "jiguang_users", "source": {"table": "users"}, "identity": {"cuid": "numeric_id"},
            "cursor": "updated_at", "vendor": {"type": "jiguang", "conn_id": "jg_test", "backoff": 0.01},
            "mapping": JG_MAPPING, "shards": 2}])
        dags, _ = load_dags(cfg, monkeypatch)
        dr = dags["usersync__jiguang_users"].test()
        assert dr.state == "success", states(dr)
        want = {}
        for r in rows:
            u = {"membership": r["plan"], "orders": r["orders"]}
            if r["points"]:
                u["points"] = r["points"]
            want[str(r["numeric_id"])] = u
        assert emu.state() == want
        assert table(sqlite_url, state.runs)[0]["status"] == "success"


def test_trigger_form_rejects_bad_input(airflow_home, sqlite_url, tmp_path, monkeypatch, dfinery_emu):
    from airflow.sdk.definitions.param import ParamValidationError

    make_users(sqlite_url, [user_row(i) for i in range(3)])
    conn_env(monkeypatch, dfinery_emu.url)
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [conn_sync("unused")])
    dags, _ = load_dags(cfg, monkeypatch)
    dag = dags["usersync__dfinery_users"]
    bad = [{"mode": "everything"}, {"window_start": "yesterday"}, {"window_end": "2026-13-01"},
           {"user_ids": "u00001"}, {"user_ids": [""]}, {"dry_run": "yes"}, {"allow_large_change": 1}]
    for i, conf in enumerate(bad):
        with pytest.raises(ParamValidationError):
            dag.test(run_conf=conf, logical_date=dt.datetime(2031, 1, 1 + i, tzinfo=dt.timezone.utc))
    # each field is described for the analyst
    for name, p in dag.params.items():
        assert p.description and p.schema.get("title"), name
    # what a schema cannot see: a window ending before it starts fails before anything is recorded
    dr = dag.test(run_conf={"window_start": "2026-02-01T00:00:00Z", "window_end": "2026-01-01T00:00:00Z"})
    assert dr.state == "failed" and states(dr)["plan"] == "failed"
    assert table(sqlite_url, state.runs) == [] and dfinery_emu.emulator.log == []
    # a good form: dry run of two users sends nothing and records a dry run (a fresh parse, as
    # every Airflow task gets: an in-process dag.test() keeps the previous run's params on the DAG)
    dr = load_dags(cfg, monkeypatch)[0]["usersync__dfinery_users"].test(run_conf={"user_ids": ["u00001", "u00002"], "dry_run": True, "mode": "full"},
                  logical_date=dt.datetime(2031, 2, 1, tzinfo=dt.timezone.utc))
    assert dr.state == "success", states(dr)
    run = table(sqlite_url, state.runs)[0]
    assert (run["status"], run["users_read"], run["users_changed"]) == ("dry_run", 2, 2)
    assert dfinery_emu.emulator.log == []


def test_backfill_window_syncs_only_rows_inside(airflow_home, sqlite_url, tmp_path, monkeypatch, dfinery_emu):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    day = dt.datetime(2026, 3, 1)
    rows = [user_row(i, updated_at=day + dt.timedelta(hours=7 * i)) for i in range(N)]  # spread over 7 days
    make_users(sqlite_url, rows)
    conn_env(monkeypatch, dfinery_emu.url)
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [conn_sync("unused", schedule="@daily")])
    monkeypatch.setenv("USERSYNC_CONFIG", str(cfg))
    sync_dags_to_db()
    env = {**os.environ}
    out = subprocess.run([str(BIN / "airflow"), "backfill", "create", "--dag-id", "usersync__dfinery_users",
                          "--from-date", "2026-03-02", "--to-date", "2026-03-03"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    with create_session() as session:
        runs = [(r.run_id, r.data_interval_start, r.data_interval_end, str(r.run_type)) for r in session.query(DagRun)
                .filter(DagRun.dag_id == "usersync__dfinery_users", DagRun.run_type == "backfill")]
    assert len(runs) == 2 and all(t == "backfill" for *_, t in runs)
    dag = DagBag(dag_folder=str(DAGS)).dags["usersync__dfinery_users"]
    for run_id, *_ in runs:
        dr = run_existing(dag, run_id)
        assert dr.state == "success", states(dr)
    utc = dt.timezone.utc
    inside = {r["user_id"] for r in rows
              if any(s <= r["updated_at"].replace(tzinfo=utc) < e for _, s, e, _ in runs)}
    assert 0 < len(inside) < N
    assert set(dfinery_emu.emulator.state()) == inside
    recorded = table(sqlite_url, state.runs)
    assert [r["mode"] for r in recorded] == ["backfill", "backfill"]
    assert table(sqlite_url, state.cursors) == []  # a window run does not move the cursor


def test_a_window_on_a_sync_without_cursor_fails_the_plan_task(airflow_home, sqlite_url, tmp_path, dfinery):
    """The plan task refuses a window on a cursorless sync as the CLI does (engine.preflight):
    nothing recorded, nothing sent."""
    from airflow.sdk.exceptions import AirflowFailException

    from connector.airflow import tasks

    make_users(sqlite_url, [user_row(i) for i in range(3)])
    cfg = str(write_config(tmp_path / "syncs.yaml", sqlite_url, [dfinery_sync(dfinery.url, cursor=None)]))
    with pytest.raises(AirflowFailException, match="sync 'dfinery_users': cursor: no cursor column"):
        tasks.plan(cfg, "dfinery_users", {"window_start": "2100-01-01T00:00:00Z"}, "manual__1", "manual", (None, None))
    assert dfinery.emulator.log == [] and table(sqlite_url, state.runs) == []


def test_locked_sync_fails_with_a_clear_message_and_sends_nothing(airflow_home, sqlite_url, tmp_path, monkeypatch,
                                                                  dfinery_emu):
    make_users(sqlite_url, [user_row(i) for i in range(5)])
    conn_env(monkeypatch, dfinery_emu.url)
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [conn_sync("unused")])
    monkeypatch.setenv("USERSYNC_LOCK_RETRIES", "0")
    dags, _ = load_dags(cfg, monkeypatch)
    c, _ = config.load(cfg)
    holder = engine.begin(engine.open_sync(c, "dfinery_users"), mode="incremental", trigger="cli")
    dr = dags["usersync__dfinery_users"].test()
    assert dr.state == "failed"
    s = states(dr)
    assert s["plan"] == "failed" and s["finalize"] == "failed"
    assert dfinery_emu.emulator.log == []
    skipped = [r for r in table(sqlite_url, state.runs) if r["status"] == "skipped"]
    assert len(skipped) == 1 and f"locked by run {holder}" in skipped[0]["error"]
    assert table(sqlite_url, state.locks)[0]["run_id"] == holder  # the holder keeps its lock


def test_two_runs_started_together_never_both_push(airflow_home, sqlite_url, tmp_path, monkeypatch, dfinery_emu):
    """Two independent Airflows (two metadata DBs: no pool or max_active_runs can help) run the
    same sync at once; the state database's lock lets one push while the other waits."""
    make_users(sqlite_url, [user_row(i) for i in range(N)])
    conn_env(monkeypatch, dfinery_emu.url)
    over = {"vendor": {"concurrency": 1}}
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [conn_sync("unused", **over)])
    dfinery_emu.emulator.add_fault("slow", delay=0.15, times=N)  # each push lasts seconds
    procs = []
    for i, home in enumerate([clone_home(airflow_home), clone_home(airflow_home)]):
        env = {**os.environ, **airflow_env(home), "USERSYNC_CONFIG": str(cfg)}
        procs.append((home, subprocess.Popen(
            [sys.executable, str(HERE / "airflow_helpers.py"), "usersync__dfinery_users", f"2032-01-0{i + 1}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    try:
        outs = [(p.wait(timeout=240), p.stdout.read()) for _, p in procs]
    finally:
        for home, p in procs:
            if p.poll() is None:
                p.kill()
            shutil.rmtree(home, ignore_errors=True)
    assert [code for code, _ in outs] == [0, 0], "\n".join(o[-3000:] for _, o in outs)
    runs = table(sqlite_url, state.runs)
    done = [r for r in runs if r["status"] == "success"]
    assert len(done) == 2 and any(r["status"] == "skipped" and "locked by run" in r["error"] for r in runs)
    # every user was sent exactly once, and the two runs' requests never interleaved
    assert len(dfinery_emu.emulator.log) == N
    spans = []
    for r in done:
        sent = [b["sent_at"] for b in table(sqlite_url, state.batches, state.batches.c.run_id == r["run_id"])]
        if sent:
            spans.append((min(sent), max(sent)))
    assert len(spans) == 1 or spans[0][1] < spans[1][0] or spans[1][1] < spans[0][0]
    assert sorted(r["users_delivered"] for r in done) == [0, N]


def test_finalize_fails_when_the_failure_threshold_is_crossed(airflow_home, sqlite_url, tmp_path, monkeypatch,
                                                              dfinery_emu):
    rows = [user_row(i) for i in range(N)]
    make_users(sqlite_url, rows)
    conn_env(monkeypatch, dfinery_emu.url)
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [conn_sync("unused", max_failure_fraction=0.1)])
    dags, _ = load_dags(cfg, monkeypatch)
    dag = dags["usersync__dfinery_users"]
    # 2 of 24 rejected (8%): under the threshold, the run is green and says partial
    dfinery_emu.emulator.add_fault("code", code="40001", match='"u00005"')
    dfinery_emu.emulator.add_fault("code", code="40001", match='"u00006"')
    dr = dag.test()
    assert dr.state == "success", states(dr)
    assert table(sqlite_url, state.runs)[-1]["status"] == "partial"
    # a property unregistered at the vendor: every user rejected, the pushes succeed, finalize fails
    del dfinery_emu.emulator.properties["birthday"]
    dr = load_dags(cfg, monkeypatch)[0]["usersync__dfinery_users"].test(run_conf={"mode": "full"}, logical_date=dt.datetime(2033, 1, 1, tzinfo=dt.timezone.utc))
    s = states(dr)
    assert dr.state == "failed" and s["finalize"] == "failed" and s["plan"] == "success"
    assert all(v == "success" for k, v in s.items() if k.startswith("push["))
    last = table(sqlite_url, state.runs)[-1]
    assert last["status"] == "partial" and last["users_rejected"] >= 2


def test_a_changed_mapping_is_backfilled_through_the_mapped_shards(airflow_home, sqlite_url, tmp_path, monkeypatch,
                                                                   dfinery_emu):
    """The plan task plans the backfill (every user, past the cursor or not); the shards push only the
    added attribute; finalize remembers the mapping; the DAG's docs name the mapping they were built from."""
    from connector import mapping

    rows = [user_row(i, updated_at=T0 + dt.timedelta(seconds=i)) for i in range(N)]
    make_users(sqlite_url, rows)
    conn_env(monkeypatch, dfinery_emu.url)
    before = [m for m in DFINERY_MAPPING if m["attribute"] != "orders"]
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [conn_sync("unused", mapping=before)])
    assert engine.run(config.load(cfg)[0], "dfinery_users").users_delivered == N
    sent = len(dfinery_emu.emulator.log)
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [conn_sync("unused")])
    dag = load_dags(cfg, monkeypatch)[0]["usersync__dfinery_users"]
    assert f"Mapping `{mapping.digest(config.load(cfg)[0].syncs[0])}`" in dag.doc_md
    dr = dag.test(logical_date=dt.datetime(2031, 1, 1, tzinfo=dt.timezone.utc))
    assert dr.state == "success", states(dr)
    assert sum(k.startswith("push[") for k in states(dr)) == 4
    new = dfinery_emu.emulator.log[sent:]
    assert sorted((r["body"]["identity"]["external_id"], r["body"]["user_properties"]) for r in new) == sorted(
        (r["user_id"], {"orders": r["orders"]}) for r in rows)
    assert dfinery_emu.emulator.state() == {r["user_id"]: dfinery_profile(r) for r in rows}
    last = max(table(sqlite_url, state.runs), key=lambda r: r["run_id"])
    assert json.loads(last["mapping_change"])["added"] == ["orders"]
    assert {r["attribute"]: r["since_run"] for r in table(sqlite_url, state.mappings)}["orders"] == last["run_id"]
