"""DFINERY end to end: a real warehouse (SQLite / PostgreSQL / MariaDB), the real engine,
the emulator over HTTP on loopback."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa

from connector import state

from vendor_cases.dfinery import dfinery_sync, expected_profile
from warehouse import T0, USERS, make_users, run, table, update_users, user_row, write_config


N = 40


@pytest.fixture
def setup(db_url, dfinery, tmp_path):
    rows = [user_row(i) for i in range(N)]
    make_users(db_url, rows)
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [dfinery_sync(dfinery.url)])
    return cfg, rows, db_url


def test_first_run_delivers_everyone_exactly(setup, dfinery):
    cfg, rows, url = setup
    s = run(cfg, "dfinery_users")
    assert (s.status, s.users_read, s.users_changed, s.users_delivered, s.requests) == ("success", N, N, N, N)
    held = dfinery.emulator.state()
    assert held == {r["user_id"]: expected_profile(r) for r in rows}
    # every request is exactly as documented
    req = dfinery.emulator.log[0]
    assert req["path"] == "/api/v1/user-profile" and req["query"] == {"service_id": "svc-1"}
    assert req["headers"]["access_token"] == "tok-secret-123"
    assert set(req["body"]) == {"identity", "user_properties", "request_datetime"}
    assert list(req["body"]["identity"]) == ["external_id"]
    assert len(table(url, state.snapshot)) == N
    assert len(table(url, state.batches)) == N


def test_no_change_sends_nothing_and_changes_send_only_changed_attributes(setup, dfinery):
    cfg, rows, url = setup
    run(cfg, "dfinery_users")
    sent = len(dfinery.emulator.log)
    second = run(cfg, "dfinery_users")
    assert second.requests == 0 and len(dfinery.emulator.log) == sent and second.status == "success"

    later = T0 + dt.timedelta(hours=1)
    update_users(url, {
        "u00001": {"plan": "enterprise", "updated_at": later},
        "u00002": {"ltv": 999.5, "orders": 6, "updated_at": later},
        "u00003": {"interests": json.dumps(["music", "chess"]), "updated_at": later},
        "u00004": {"note": "only an unmapped column", "updated_at": later},
    })
    third = run(cfg, "dfinery_users")
    new = dfinery.emulator.log[sent:]
    assert third.requests == 3 and len(new) == 3
    by_user = {r["body"]["identity"]["external_id"]: r["body"]["user_properties"] for r in new}
    assert by_user == {"u00001": {"membership": "enterprise"}, "u00002": {"ltv": 999.5, "orders": 6},
                       "u00003": {"interests": ["music", "chess"]}}
    assert dfinery.emulator.state()["u00002"]["ltv"] == 999.5


def test_cursor_reads_only_new_rows_and_keeps_boundary_rows(setup, dfinery):
    cfg, rows, url = setup
    first = run(cfg, "dfinery_users")
    assert first.users_read == N
    again = run(cfg, "dfinery_users")
    assert again.users_read == N  # every row sits on the watermark: re-read, but nothing sent
    assert again.requests == 0
    # a row committed late with the same cursor value as the watermark is not lost
    make_rows = table(url, state.cursors)
    assert make_rows and json.loads(make_rows[0]["watermark"])["t"] in ("datetime", "value")
    later = T0 + dt.timedelta(minutes=5)
    update_users(url, {"u00005": {"plan": "pro-max", "updated_at": later}})
    third = run(cfg, "dfinery_users")  # watermark was T0: all rows re-read, one sent
    assert third.users_read == N and third.users_delivered == 1 and third.requests == 1
    # the watermark is now `later`: a row committed late with exactly that value is still read
    with sa.create_engine(url).begin() as c:
        c.execute(USERS.insert(), [user_row(1000, updated_at=later)])
    fourth = run(cfg, "dfinery_users")
    assert fourth.users_read == 2 and fourth.users_delivered == 1 and "u01000" in dfinery.emulator.state()
    assert run(cfg, "dfinery_users").requests == 0


def test_boundary_rows_kept_as_text_without_fractions_are_not_lost(setup, dfinery):
    """SQLite holds datetimes as text; rows written by other tools carry no '.000000'. A row
    committed late with exactly the watermark's value must still be read next run."""
    cfg, rows, url = setup
    if not url.startswith("sqlite"):
        pytest.skip("only SQLite keeps datetimes as text")
    later = (T0 + dt.timedelta(minutes=5)).strftime("%Y-%m-%d %H:%M:%S")
    change = sa.text("UPDATE users SET plan = :plan, updated_at = :t WHERE user_id = :u")
    with sa.create_engine(url).begin() as c:
        c.execute(change, {"plan": "pro-max", "t": later, "u": "u00005"})
    assert run(cfg, "dfinery_users").users_delivered == N  # the watermark is now `later`
    with sa.create_engine(url).begin() as c:
        c.execute(change, {"plan": "gold", "t": later, "u": "u00006"})
    second = run(cfg, "dfinery_users")
    assert second.users_read == 2 and second.users_delivered == 1
    assert dfinery.emulator.state()["u00006"]["membership"] == "gold"


def test_unregistered_property_is_rejected_with_vendor_message(setup, dfinery, tmp_path):
    cfg, rows, url = setup
    del dfinery.emulator.properties["birthday"]  # not registered in the console
    s = run(cfg, "dfinery_users")
    assert s.status == "partial" and s.users_rejected == N and s.users_delivered == 0
    assert not s.ok  # far beyond the failure tolerance
    f = table(url, state.failures)[0]
    assert f["code"] == "40001" and "birthday" in f["message"] and "not registered" in f["message"]


def test_internal_error_then_success_records_attempts(setup, dfinery):
    cfg, rows, url = setup
    dfinery.emulator.add_fault("code", code="50000", times=2, match='"u00003"')
    dfinery.emulator.add_fault("status", status=503, body="upstream down", match='"u00004"')
    s = run(cfg, "dfinery_users")
    assert s.status == "success" and s.users_delivered == N and s.requests == N + 3
    batches = {b["first_user"]: b for b in table(url, state.batches)}
    assert batches["u00003"]["attempts"] == 3 and batches["u00003"]["outcome"] == "delivered"
    assert batches["u00004"]["attempts"] == 2
    assert batches["u00001"]["attempts"] == 1 and batches["u00001"]["vendor_code"] == "20000"


def test_bad_token_stops_the_run_at_once(setup, dfinery, monkeypatch):
    cfg, rows, url = setup
    monkeypatch.setenv("TEST_DFINERY_TOKEN", "wrong")
    s = run(cfg, "dfinery_users")
    assert s.status == "failed" and not s.ok and "40201" in s.error
    assert len(dfinery.emulator.log) == 1  # the first request goes alone; nothing follows a refusal
    assert dfinery.emulator.state() == {} and table(url, state.snapshot) == []
    assert "wrong" not in (s.error or "")


def test_throttling_waits_and_delivers(sqlite_url, dfinery, tmp_path):
    make_users(sqlite_url, [user_row(i) for i in range(10)])
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [dfinery_sync(dfinery.url)])
    dfinery.emulator.add_fault("throttle", delay=1, match='"u00002"')
    s = run(cfg, "dfinery_users")
    assert s.status == "success" and s.users_delivered == 10
    b = [x for x in table(sqlite_url, state.batches) if x["first_user"] == "u00002"][0]
    assert b["attempts"] == 2


def test_bad_value_sets_its_attribute_aside_and_the_run_goes_on(sqlite_url, dfinery, tmp_path):
    rows = [user_row(i) for i in range(6)]
    rows[2]["interests"] = "not json ["
    make_users(sqlite_url, rows)
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [dfinery_sync(dfinery.url)])
    s = run(cfg, "dfinery_users")
    assert s.users_delivered == 6 and s.users_rejected == 1 and s.status == "partial"
    (f,) = table(sqlite_url, state.failures)
    assert (f["user_key"], f["attribute"], f["error_class"]) == ("u00002", "interests", "invalid")
    assert "interests" in f["message"]
    held = dfinery.emulator.state()["u00002"]  # the user's other attributes delivered
    assert "interests" not in held and held["membership"] == rows[2]["plan"]


def test_full_refresh_resends_every_set_attribute_without_tripping_the_guard(sqlite_url, dfinery, tmp_path):
    make_users(sqlite_url, [user_row(i) for i in range(20)])
    guard = {"max_changed_fraction": 0.5, "min_users": 10}
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [dfinery_sync(dfinery.url, guard=guard)])
    run(cfg, "dfinery_users")
    held = dfinery.emulator.state()
    full = run(cfg, "dfinery_users", full_refresh=True)
    assert full.status == "success" and full.requests == 20  # unchanged values re-sent: no blast radius
    assert dfinery.emulator.state() == held
    update_users(sqlite_url, {f"u{i:05d}": {"plan": "gold", "updated_at": T0 + dt.timedelta(hours=1)} for i in range(15)})
    blocked = run(cfg, "dfinery_users")
    assert blocked.status == "blocked" and blocked.requests == 0 and "15 of 20" in blocked.error
    assert run(cfg, "dfinery_users", allow_large_change=True).users_delivered == 15
