"""MoEngage end to end: a real warehouse (SQLite / PostgreSQL / MariaDB), the real engine,
the emulator over HTTP on loopback — track user (one per call) and bulk transition."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
import requests

from connector import config, engine, state
from connector.config import ConfigError
from connector.vendors import emulator
from connector.vendors.base import Limit
from connector.vendors.moengage import settings as vendor
from connector.vendors.moengage.emulator import Emulator

from vendor_cases.moengage import KEY, MAPPING, WORKSPACE, expected, moengage_sync
from warehouse import T0, make_users, run, table, update_users, user_row, write_config


N = 30
@pytest.fixture
def moengage(monkeypatch):
    monkeypatch.setenv("TEST_MOENGAGE_KEY", KEY)
    with emulator.Running(Emulator(workspace_id=WORKSPACE, api_key=KEY)) as running:
        yield running


@pytest.fixture
def setup(db_url, moengage, tmp_path):
    rows = [user_row(i) for i in range(N)]
    make_users(db_url, rows)
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [moengage_sync(moengage.url)])
    return cfg, rows, db_url


def sent_by_user(log: list[dict]) -> dict[str, dict]:
    """customer_id -> attributes, over track bodies and bulk elements alike."""
    out = {}
    for r in log:
        body = r["body"]
        for obj in body["elements"] if body.get("type") == "transition" else [body]:
            out[obj["customer_id"]] = obj["attributes"]
    return out


# -- track user ------------------------------------------------------------------------------
def test_first_run_delivers_everyone_exactly(setup, moengage):
    cfg, rows, url = setup
    s = run(cfg, "moengage_users")
    assert (s.status, s.users_read, s.users_changed, s.users_delivered, s.requests) == ("success", N, N, N, N)
    assert moengage.emulator.state() == {r["user_id"]: expected(r) for r in rows}
    req = moengage.emulator.log[0]
    assert req["path"] == f"/v1/customer/{WORKSPACE}"
    assert req["headers"]["authorization"] == "Basic " + base64.b64encode(f"{WORKSPACE}:{KEY}".encode()).decode()
    assert req["headers"]["moe-appkey"] == WORKSPACE
    assert set(req["body"]) == {"type", "customer_id", "attributes"} and req["body"]["type"] == "customer"
    # datetimes in MoEngage's format are taken as datetimes, not strings
    assert moengage.emulator.types["signup_at"] == "datetime" and moengage.emulator.types["birthday"] == "datetime"
    assert len(table(url, state.snapshot)) == N and len(table(url, state.batches)) == N


def test_no_change_sends_nothing_and_changes_send_only_changed_attributes(setup, moengage):
    cfg, rows, url = setup
    run(cfg, "moengage_users")
    sent = len(moengage.emulator.log)
    again = run(cfg, "moengage_users")
    assert again.status == "success" and again.requests == 0 and len(moengage.emulator.log) == sent

    later = T0 + dt.timedelta(hours=1)
    update_users(url, {
        "u00001": {"plan": "enterprise", "updated_at": later},
        "u00002": {"ltv": 999.5, "orders": 6, "updated_at": later},
        "u00003": {"interests": json.dumps(["music", "chess"]), "updated_at": later},
        "u00004": {"updated_at": later},  # touched, nothing mapped changed
    })
    third = run(cfg, "moengage_users")
    assert third.requests == 3 and third.users_delivered == 3
    assert sent_by_user(moengage.emulator.log[sent:]) == {
        "u00001": {"membership": "enterprise"}, "u00002": {"ltv": 999.5, "orders": 6},
        "u00003": {"interests": ["music", "chess"]}}
    rows[1]["plan"], rows[2]["ltv"], rows[2]["orders"] = "enterprise", 999.5, 6
    rows[3]["interests"] = json.dumps(["music", "chess"])
    assert moengage.emulator.state() == {r["user_id"]: expected(r) for r in rows}


def test_once_attribute_is_never_sent_again(setup, moengage):
    cfg, rows, url = setup
    run(cfg, "moengage_users")
    first_signup = moengage.emulator.state()["u00005"]["signup_at"]
    sent = len(moengage.emulator.log)
    later = T0 + dt.timedelta(hours=1)
    update_users(url, {"u00005": {"signup_at": dt.datetime(2020, 5, 5, 5, 5, 5), "plan": "pro", "updated_at": later},
                       "u00006": {"signup_at": dt.datetime(2020, 6, 6), "updated_at": later}})
    s = run(cfg, "moengage_users")
    assert s.requests == 1 and sent_by_user(moengage.emulator.log[sent:]) == {"u00005": {"membership": "pro"}}
    # not even a full refresh re-sends it
    full = run(cfg, "moengage_users", full_refresh=True)
    assert full.status == "success"
    assert all("signup_at" not in attrs for attrs in sent_by_user(moengage.emulator.log[sent:]).values())
    held = moengage.emulator.state()
    assert held["u00005"]["signup_at"] == first_signup == expected(rows[5])["signup_at"]
    assert held["u00006"]["signup_at"] == expected(rows[6])["signup_at"]


def test_retryable_errors_are_retried_with_attempts_recorded(setup, moengage):
    cfg, rows, url = setup
    moengage.emulator.add_fault("code", code=500, times=2, match='"u00003"')
    moengage.emulator.add_fault("status", status=503, body="upstream down", match='"u00004"')
    moengage.emulator.add_fault("reset", match='"u00005"')
    s = run(cfg, "moengage_users")
    assert s.status == "success" and s.users_delivered == N and s.requests == N + 4
    batches = {b["first_user"]: b for b in table(url, state.batches)}
    assert (batches["u00003"]["attempts"], batches["u00003"]["outcome"]) == (3, "delivered")
    assert batches["u00004"]["attempts"] == 2 and batches["u00005"]["attempts"] == 2
    assert batches["u00001"]["attempts"] == 1 and batches["u00001"]["http_status"] == 200
    assert moengage.emulator.state() == {r["user_id"]: expected(r) for r in rows}


def test_bad_api_key_stops_the_run_at_once(setup, moengage, monkeypatch):
    cfg, rows, url = setup
    monkeypatch.setenv("TEST_MOENGAGE_KEY", "wrong-key")
    s = run(cfg, "moengage_users")
    assert s.status == "failed" and not s.ok and "401" in s.error and "Authentication" in s.error
    assert len(moengage.emulator.log) == 1  # the first request goes alone; nothing follows a refusal
    assert moengage.emulator.state() == {} and table(url, state.snapshot) == []
    assert "wrong-key" not in s.error


def test_throttle_waits_for_the_reset_header(sqlite_url, moengage, tmp_path):
    make_users(sqlite_url, [user_row(i) for i in range(6)])
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [moengage_sync(moengage.url)])
    moengage.emulator.add_fault("throttle", delay=1, match='"u00002"')
    s = run(cfg, "moengage_users")
    assert s.status == "success" and s.users_delivered == 6
    # x-ratelimit-reset: 1 was honoured, not the 0.01 s backoff (as the vendor saw the requests arrive)
    throttled, retried = [r["at"] for r in moengage.emulator.log if r["body"]["customer_id"] == "u00002"]
    assert retried - throttled >= 0.9
    b = [x for x in table(sqlite_url, state.batches) if x["first_user"] == "u00002"][0]
    assert b["attempts"] == 2 and b["outcome"] == "delivered"


def test_reserved_customer_ids_are_set_aside_before_any_request(sqlite_url, moengage, tmp_path):
    reserved = ["guest", "NULL", "N/A", "-1", "Unknown", "0"]
    rows = [user_row(i) for i in range(4)] + [user_row(100 + i, user_id=u) for i, u in enumerate(reserved)]
    make_users(sqlite_url, rows)
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [moengage_sync(moengage.url)])
    s = run(cfg, "moengage_users")
    assert s.users_delivered == 4 and s.users_rejected == len(reserved) and s.requests == 4
    assert {r["body"]["customer_id"] for r in moengage.emulator.log} == {"u00000", "u00001", "u00002", "u00003"}
    fails = {f["user_key"]: f for f in table(sqlite_url, state.failures)}
    assert set(fails) == set(reserved)
    assert all(f["error_class"] == "invalid" and "reserved" in f["message"] for f in fails.values())
    assert set(moengage.emulator.state()) == {"u00000", "u00001", "u00002", "u00003"}


def test_oversize_string_and_long_array_set_aside_only_their_attribute(sqlite_url, moengage, tmp_path):
    rows = [user_row(i) for i in range(5)]
    rows[1]["note"] = "x" * 513
    rows[2]["interests"] = json.dumps([f"i{k}" for k in range(51)])
    rows[3]["note"] = "y" * 512  # at the limit: fine
    rows[4]["interests"] = json.dumps([f"i{k}" for k in range(50)])
    make_users(sqlite_url, rows)
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [moengage_sync(moengage.url)])
    s = run(cfg, "moengage_users")
    assert s.users_delivered == 5 and s.users_rejected == 2 and s.requests == 5
    fails = {(f["user_key"], f["attribute"]): f["message"] for f in table(sqlite_url, state.failures)}
    assert set(fails) == {("u00001", "note"), ("u00002", "interests")}
    assert "value too long" in fails["u00001", "note"] and "not a valid list" in fails["u00002", "interests"]
    held = {r["user_id"]: expected(r) for r in rows}  # the rest of those users delivered
    del held["u00001"]["note"], held["u00002"]["interests"]
    assert moengage.emulator.state() == held


@pytest.mark.parametrize("name", ["id", "_id", "", "moe_score", "MOE_rank", "status", "user_id", "source"])
def test_blocked_attribute_names_fail_config_validation(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TEST_MOENGAGE_KEY", KEY)
    mapping = MAPPING[:2] + [{"column": "orders", "attribute": name, "type": "Long"}]
    cfg = write_config(tmp_path / "syncs.yaml", "sqlite://", [moengage_sync("http://127.0.0.1:9", mapping=mapping)])
    with pytest.raises(ConfigError) as e:
        config.load(cfg)
    assert e.value.field == "mapping[2].attribute" and e.value.sync == "moengage_users"
    assert repr(name) in e.value.message


def test_settings_choose_host_and_request_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_MOENGAGE_KEY", KEY)
    sync = moengage_sync(None)
    del sync["vendor"]["base_url"]
    sync["vendor"]["settings"]["data_center"] = 4
    bulk = dict(moengage_sync("http://127.0.0.1:1", api="bulk"), name="bulk_users")
    cfg = write_config(tmp_path / "syncs.yaml", "sqlite://", [sync, bulk])
    loaded, _ = config.load(cfg)
    track_client = engine.Sync(loaded, loaded.sync("moengage_users")).client()
    bulk_client = engine.Sync(loaded, loaded.sync("bulk_users")).client()
    assert track_client.base_url == "https://api-04.moengage.com"
    assert bulk_client.base_url == "http://127.0.0.1:1"  # base_url overrides the data center
    # one budget of 10,000 users a minute across both APIs [doc], counted in users
    assert track_client.limit == bulk_client.limit == Limit(10_000, 60.0, "users")
    assert track_client.max_users == 1 and bulk_client.max_users > 1
    bad = dict(sync, vendor={**sync["vendor"], "settings": {"workspace_id": WORKSPACE, "data_center": 7}})
    with pytest.raises(ConfigError) as e:
        config.load(write_config(tmp_path / "bad.yaml", "sqlite://", [bad]))
    assert e.value.field == "vendor.settings.data_center"


# -- bulk transition ---------------------------------------------------------------------------
def test_bulk_packs_many_users_per_request_under_100kb(db_url, moengage, tmp_path):
    n = 60
    rows = [user_row(i, note=f"{i:03d}" + "n" * 509) for i in range(n)]  # 512 chars each
    make_users(db_url, rows)
    mapping = MAPPING + [{"column": "note", "attribute": f"note{k}", "type": "String"} for k in range(1, 4)]
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [moengage_sync(moengage.url, api="bulk", mapping=mapping)])
    s = run(cfg, "moengage_users")
    log = moengage.emulator.log
    assert s.status == "success" and s.users_delivered == n and s.requests == len(log)
    sizes = [len(json.dumps(r["body"]).encode()) for r in log]
    total = sum(sizes)
    assert total > 100 * 1024 and 2 <= len(log) <= 3  # needs more than one call, packed close to the limit
    assert all(size <= 100 * 1024 for size in sizes)
    assert all(r["path"] == f"/v1/transition/{WORKSPACE}" and r["body"]["type"] == "transition" for r in log)
    assert sum(len(r["body"]["elements"]) for r in log) == n
    assert moengage.emulator.dropped == []
    assert moengage.emulator.state() == {
        r["user_id"]: {**expected(r), **{f"note{k}": r["note"] for k in range(1, 4)}} for r in rows}
    assert run(cfg, "moengage_users").requests == 0


def test_bulk_413_splits_the_batch(db_url, moengage, tmp_path):
    rows = [user_row(i) for i in range(N)]
    make_users(db_url, rows)
    moengage.emulator.bulk_max_bytes = 4_000  # the whole batch is ~9 KB: a 413, then halves, then quarters
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [moengage_sync(moengage.url, api="bulk")])
    s = run(cfg, "moengage_users")
    assert s.status == "success" and s.users_delivered == N
    statuses = [b["http_status"] for b in table(db_url, state.batches)]
    outcomes = sorted(b["outcome"] for b in table(db_url, state.batches))
    assert statuses.count(413) == outcomes.count("split") >= 1 and "delivered" in outcomes
    first = moengage.emulator.log[0]["body"]["elements"]
    assert len(first) == N  # everyone was packed into one call before the vendor refused it
    assert moengage.emulator.state() == {r["user_id"]: expected(r) for r in rows}


def test_bulk_bad_key_stops_after_one_request(sqlite_url, moengage, tmp_path, monkeypatch):
    make_users(sqlite_url, [user_row(i) for i in range(N)])
    monkeypatch.setenv("TEST_MOENGAGE_KEY", "nope")
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [moengage_sync(moengage.url, api="bulk")])
    s = run(cfg, "moengage_users")
    assert s.status == "failed" and "401" in s.error and len(moengage.emulator.log) == 1


# -- the emulator's own rules, over HTTP -----------------------------------------------------------
def _post(url: str, path: str, body, key: str = KEY, **headers):
    token = base64.b64encode(f"{WORKSPACE}:{key}".encode()).decode()
    return requests.post(url + path.format(workspace_id=WORKSPACE), json=body, timeout=5,
                         headers={"Authorization": f"Basic {token}", "MOE-APPKEY": WORKSPACE, **headers})


def test_emulator_enforces_the_documented_rules(moengage):
    url, emu = moengage.url, moengage.emulator
    track, bulk = vendor.TRACK_PATH, vendor.BULK_PATH
    ok = {"type": "customer", "customer_id": "c1", "attributes": {"plan": "pro"}}
    r = _post(url, track, ok)
    assert r.status_code == 200 and r.json()["status"] == "success"
    assert int(r.headers["x-ratelimit-limit"]) == 10_000 and 0 < float(r.headers["x-ratelimit-reset"]) <= 60
    assert _post(url, track, ok, key="bad").status_code == 401
    assert _post(url, track, ok, **{"MOE-APPKEY": "other"}).status_code == 401
    assert _post(url, track, {**ok, "type": "Customer"}).status_code == 400  # case-sensitive
    assert _post(url, track, {**ok, "customer_id": "Guest"}).status_code == 400
    for name in ("id", "moe_x", "status"):
        r = _post(url, track, {**ok, "attributes": {name: 1}})
        assert r.status_code == 400 and r.json()["error"]["attribute"] == name
    assert _post(url, track, {**ok, "attributes": {"tags": list(range(51))}}).status_code == 400
    assert _post(url, track, {**ok, "attributes": {"blob": "z" * 512, **{f"a{i}": "z" * 500 for i in range(260)}}}
                 ).status_code == 413  # over 128 KB
    # a datetime in another format is kept as sent, as a string attribute
    assert _post(url, track, {**ok, "customer_id": "c2", "attributes": {"seen": "2026-01-01 12:00:00"}}).ok
    assert emu.state()["c2"]["seen"] == "2026-01-01 12:00:00" and emu.types["seen"] == "string"
    # bulk: always 200, a bad element is dropped silently
    r = _post(url, bulk, {"type": "transition", "elements": [
        {"type": "customer", "customer_id": "c3", "attributes": {"plan": "free"}},
        {"type": "customer", "customer_id": "null", "attributes": {"plan": "free"}}]})
    assert r.status_code == 200 and r.json()["status"] == "success"
    assert "c3" in emu.state() and "null" not in emu.state() and len(emu.dropped) == 1
    assert _post(url, bulk, {"type": "Transition", "elements": []}).status_code == 400
    big = [{"type": "customer", "customer_id": f"b{i}", "attributes": {"n": "z" * 500}} for i in range(210)]
    assert _post(url, bulk, {"type": "transition", "elements": big}).status_code == 413  # over 100 KB


def test_emulator_rate_limit_answers_429_with_headers(monkeypatch):
    with emulator.Running(Emulator(workspace_id=WORKSPACE, api_key=KEY, rate_limit=3)) as running:
        body = {"type": "customer", "customer_id": "c1", "attributes": {"a": 1}}
        answers = [_post(running.url, vendor.TRACK_PATH, body) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[3].headers["x-ratelimit-remaining"] == "0" and 0 < float(answers[3].headers["x-ratelimit-reset"]) <= 60
        running.emulator.reset()  # a fresh window: the budget is users, across both APIs
        running.emulator.rate_limit = 5
        elements = [{**body, "customer_id": f"c{i}"} for i in range(4)]
        first = _post(running.url, vendor.BULK_PATH, {"type": "transition", "elements": elements})
        track = _post(running.url, vendor.TRACK_PATH, body)
        second = _post(running.url, vendor.BULK_PATH, {"type": "transition", "elements": elements})
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining"] == "1"
        assert track.status_code == 200 and track.headers["x-ratelimit-remaining"] == "0"
        assert second.status_code == 429  # 9 users over a limit of 5 a minute
