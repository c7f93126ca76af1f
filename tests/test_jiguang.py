"""Jiguang Operation Growth end to end: a real warehouse (SQLite / PostgreSQL / MariaDB), the
real engine, the emulator over HTTP on loopback — which applies each attribute's console
rule, so double-counting or re-sending shows up in what the vendor holds."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re

import pytest
import requests
import sqlalchemy as sa

from connector import config, state
from connector.vendors import emulator
from connector.vendors.jiguang import client, emulator as jiguang

from vendor_cases.jiguang import CONSOLE, MAPPING, SECRET, cuid, expected, jiguang_sync
from warehouse import T0, make_users, run, table, update_users, user_row, write_config


N = 30


@pytest.fixture
def jg(monkeypatch):
    """A Jiguang emulator on loopback with the test mapping's attributes and rules registered."""
    monkeypatch.setenv("TEST_JIGUANG_SECRET", SECRET)
    emu = jiguang.Emulator(project_id="proj-7", project_secret=SECRET,
                           attributes={m["attribute"]: {"type": m["type"], "rule": m.get("rule", "set")}
                                       for m in MAPPING})
    with emulator.Running(emu) as running:
        yield running


@pytest.fixture
def setup(db_url, jg, tmp_path):
    rows = [user_row(i) for i in range(N)]
    make_users(db_url, rows)
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [jiguang_sync(jg.url)])
    return cfg, rows, db_url


def sent_to(jg, i: int, since: int = 0, until: int | None = None) -> list[dict]:
    """The ``data`` of every request the vendor received for user i (log entries since..until)."""
    return [r["body"]["data"] for r in jg.emulator.log[since:until] if r["body"]["cuid"] == cuid(i)]


# -- the common behaviour -------------------------------------------------------------------
def test_first_run_leaves_vendor_equal_to_warehouse(setup, jg):
    cfg, rows, url = setup
    s = run(cfg, "jiguang_users")
    assert (s.status, s.users_read, s.users_changed, s.users_delivered, s.requests) == ("success", N, N, N, N)
    assert jg.emulator.state() == {str(cuid(i)): expected(r) for i, r in enumerate(rows)}
    # every request is exactly as documented
    req = jg.emulator.log[0]
    assert req["method"] == "PUT" and req["path"] == "/smartop/api/v1/user/attribute"
    assert req["headers"]["authorization"] == "Basic " + base64.b64encode(f"proj-7:{SECRET}".encode()).decode()
    assert set(req["body"]) == {"cuid", "data"} and type(req["body"]["cuid"]) is int
    data = [r["body"]["data"] for r in jg.emulator.log]
    assert all(d["subscribed"] in (0, 1) and type(d["subscribed"]) is int for d in data)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", d["signup_at"]) for d in data)
    assert len(table(url, state.snapshot)) == N and len(table(url, state.batches)) == N


def test_no_change_sends_nothing_and_changes_send_only_changed_attributes(setup, jg):
    cfg, rows, url = setup
    run(cfg, "jiguang_users")
    sent = len(jg.emulator.log)
    second = run(cfg, "jiguang_users")
    assert second.status == "success" and second.requests == 0 and len(jg.emulator.log) == sent

    later = T0 + dt.timedelta(hours=1)
    update_users(url, {
        "u00001": {"plan": "enterprise", "updated_at": later},
        "u00002": {"ltv": 999.5, "orders": 6, "updated_at": later},
        "u00004": {"note": "only an unmapped column", "updated_at": later},
    })
    third = run(cfg, "jiguang_users")
    new = jg.emulator.log[sent:]
    assert third.requests == 2 and len(new) == 2
    assert {r["body"]["cuid"]: r["body"]["data"] for r in new} == {
        cuid(1): {"membership": "enterprise"}, cuid(2): {"ltv": 999.5, "orders": 6}}
    held = jg.emulator.state()
    assert held[str(cuid(2))] == {**expected(rows[2]), "ltv": 999.5, "orders": 6}
    assert held[str(cuid(1))]["membership"] == "enterprise"


def test_rules_hold_over_several_runs_even_after_a_retried_internal_error(setup, jg):
    """accumulate ends at the warehouse value; append gains only new items; once is sent once."""
    cfg, rows, url = setup
    first_signup = rows[1]["signup_at"]
    run(cfg, "jiguang_users")  # user 1: points 10, interests ["music"]
    t = T0
    steps = [(25, ["music", "travel"]), (40, ["travel", "chess"])]
    marks = [0]
    for n, (points, interests) in enumerate(steps):
        t += dt.timedelta(hours=1)
        marks.append(len(jg.emulator.log))
        update_users(url, {"u00001": {"points": points, "interests": json.dumps(interests),
                                      "signup_at": T0 + dt.timedelta(days=n + 1), "updated_at": t}})
        if n == 1:  # the vendor fails once with -1 (not applied): the client retries
            jg.emulator.add_fault("code", code=-1, match=f'"cuid": {cuid(1)},')
        s = run(cfg, "jiguang_users")
        assert s.status == "success" and s.users_delivered == 1
    assert [sent_to(jg, 1, m)[0].get("points") for m in marks] == [10, 15, 15]
    assert sent_to(jg, 1, marks[1], marks[2]) == [{"points": 15, "interests": ["travel"]}]
    assert sent_to(jg, 1, marks[2]) == [{"points": 15, "interests": ["chess"]}] * 2  # -1, then the retry
    assert not any("signup_at" in d for d in sent_to(jg, 1, marks[1]))  # once: never re-sent
    held = jg.emulator.state()[str(cuid(1))]
    assert held["points"] == 40  # 10 + 15 + 15: exactly the warehouse value
    assert held["interests"] == ["music", "travel", "chess"]  # append: nothing removed, nothing twice
    assert held["signup_at"] == first_signup.strftime("%Y-%m-%d %H:%M:%S")
    last = [b for b in table(url, state.batches) if b["first_user"] == str(cuid(1))][-1]
    assert (last["attempts"], last["outcome"], last["vendor_code"]) == (2, "delivered", "0")
    assert run(cfg, "jiguang_users").requests == 0
    assert jg.emulator.state()[str(cuid(1))]["points"] == 40


def test_rejected_user_is_recorded_and_retried_next_run(setup, jg):
    cfg, rows, url = setup
    jg.emulator.cuids = {cuid(i) for i in range(N) if i != 7}  # CUID 7 not (yet) in the project
    s = run(cfg, "jiguang_users")
    assert s.status == "partial" and s.users_rejected == 1 and s.users_delivered == N - 1
    fails = table(url, state.failures)
    assert [(f["user_key"], f["error_class"], f["code"]) for f in fails] == [(str(cuid(7)), "rejected", "40003")]
    assert "invalid CUID" in fails[0]["message"] and str(cuid(7)) in fails[0]["message"]
    assert str(cuid(7)) not in jg.emulator.state()
    jg.emulator.cuids.add(cuid(7))  # the user registered meanwhile
    s2 = run(cfg, "jiguang_users")
    assert s2.status == "success" and s2.users_delivered == 1 and s2.requests == 1
    assert jg.emulator.state()[str(cuid(7))] == expected(rows[7])
    assert table(url, state.failures) == []


def test_missing_attribute_40010_names_it_in_sync_failures(setup, jg):
    cfg, rows, url = setup
    del jg.emulator.attributes["points"]  # not created in the console
    s = run(cfg, "jiguang_users")
    # user 0 has 0 points: nothing to accumulate, so its request carries no 'points'
    assert s.status == "partial" and s.users_rejected == N - 1 and s.users_delivered == 1 and not s.ok
    fails = table(url, state.failures)
    assert len(fails) == N - 1 and {f["code"] for f in fails} == {"40010"}
    assert all("'points'" in f["message"] and "用户属性[points]不存在" in f["message"] for f in fails)
    assert list(jg.emulator.state()) == [str(cuid(0))]


def test_retryable_errors_are_retried_with_attempts_and_nothing_counted_twice(setup, jg):
    cfg, rows, url = setup
    jg.emulator.add_fault("code", code=-1, times=2, match=f'"cuid": {cuid(3)},')
    jg.emulator.add_fault("throttle", delay=0.2, match=f'"cuid": {cuid(5)},')
    s = run(cfg, "jiguang_users")
    assert s.status == "success" and s.users_delivered == N and s.requests == N + 3
    batches = {b["first_user"]: b for b in table(url, state.batches)}
    assert (batches[str(cuid(3))]["attempts"], batches[str(cuid(3))]["outcome"]) == (3, "delivered")
    assert batches[str(cuid(5))]["attempts"] == 2
    assert batches[str(cuid(1))]["attempts"] == 1 and batches[str(cuid(1))]["vendor_code"] == "0"
    assert jg.emulator.state() == {str(cuid(i)): expected(r) for i, r in enumerate(rows)}


def test_lost_answer_on_accumulate_is_never_resent(setup, jg):
    """The vendor applied the request but the answer was lost: re-sending would double-count."""
    cfg, rows, url = setup
    jg.emulator.add_fault("lost", match=f'"cuid": {cuid(4)},')
    s = run(cfg, "jiguang_users")
    assert s.users_failed == 1 and len(sent_to(jg, 4)) == 1
    (f,) = table(url, state.failures)
    assert (f["user_key"], f["error_class"]) == (str(cuid(4)), "in_doubt")
    assert jg.emulator.state()[str(cuid(4))]["points"] == 40
    update_users(url, {"u00004": {"points": 55, "updated_at": T0 + dt.timedelta(hours=1)}})
    s2 = run(cfg, "jiguang_users")
    assert s2.status == "success"
    assert [d.get("points") for d in sent_to(jg, 4)] == [40, 15]
    assert jg.emulator.state()[str(cuid(4))] == {**expected(rows[4]), "points": 55}
    assert table(url, state.failures) == []


def test_auth_failure_stops_the_run_at_once(setup, jg, monkeypatch):
    cfg, rows, url = setup
    monkeypatch.setenv("TEST_JIGUANG_SECRET", "wrong-secret")
    s = run(cfg, "jiguang_users")
    assert s.status == "failed" and not s.ok and "4009" in s.error and "authentication" in s.error
    assert len(jg.emulator.log) == 1  # the first request goes alone; nothing follows a refusal
    assert jg.emulator.state() == {} and table(url, state.snapshot) == []
    assert "wrong-secret" not in s.error


# -- Jiguang specifics ----------------------------------------------------------------------
def test_rate_limit_429_waits_for_the_reset_and_delivers(sqlite_url, jg, tmp_path):
    rows = [user_row(i) for i in range(8)]
    make_users(sqlite_url, rows)
    sync = jiguang_sync(jg.url)
    sync["vendor"]["rate_limit"] = 50  # the client told a higher rate than the project allows
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [sync])
    jg.emulator.rate_limit = 4
    s = run(cfg, "jiguang_users")
    assert s.status == "success" and s.users_delivered == 8 and s.requests > 8
    assert max(b["attempts"] for b in table(sqlite_url, state.batches)) >= 2
    assert jg.emulator.state() == {str(cuid(i)): expected(r) for i, r in enumerate(rows)}  # no double count


def test_client_stays_under_100_qps(sqlite_url, jg, tmp_path):
    rows = [user_row(i) for i in range(110)]
    make_users(sqlite_url, rows)
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [jiguang_sync(jg.url)])
    assert jg.emulator.rate_limit == 100
    s = run(cfg, "jiguang_users")
    assert s.status == "success" and s.requests == 110  # not one 429
    assert len(jg.emulator.state()) == 110


CUIDS = sa.Table("members", sa.MetaData(), sa.Column("cuid", sa.String(20), primary_key=True),
                 sa.Column("plan", sa.String(20)))


def test_non_numeric_cuid_rejects_the_user_before_sending(db_url, jg, tmp_path):
    eng = sa.create_engine(db_url)
    CUIDS.create(eng)
    with eng.begin() as c:
        c.execute(CUIDS.insert(), [{"cuid": v, "plan": "pro"} for v in ("1001", "abc", "-5", "12.5", "1002")])
    eng.dispose()
    sync = jiguang_sync(jg.url, source={"table": "members"}, identity={"cuid": "cuid"}, cursor=None,
                        mapping=[{"column": "plan", "attribute": "membership", "type": "String"}])
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [sync])
    s = run(cfg, "jiguang_users")
    assert s.users_delivered == 2 and s.users_rejected == 3 and s.requests == 2
    assert jg.emulator.state() == {"1001": {"membership": "pro"}, "1002": {"membership": "pro"}}
    fails = {f["user_key"]: f for f in table(db_url, state.failures)}
    assert set(fails) == {"abc", "-5", "12.5"}
    assert all(f["error_class"] == "invalid" and "not a numeric Jiguang CUID" in f["message"] for f in fails.values())


@pytest.mark.parametrize("change, field, words", [
    ({"attribute": "Points"}, "mapping[0].attribute", "lowercase"),
    ({"attribute": "1st_order"}, "mapping[0].attribute", "starting with a letter"),
    ({"rule": "accumulate", "type": "String"}, "mapping[0].rule", "numeric"),
    ({"rule": "append", "type": "Long"}, "mapping[0].rule", "list"),
    ({"rule": "replace"}, "mapping[0].rule", "not a jiguang rule"),
    ({"null": "send"}, "mapping[0].null", "cannot"),
    ({"type": "Date"}, "mapping[0].type", "not a jiguang type"),
])
def test_config_is_checked_before_anything_runs(tmp_path, monkeypatch, change, field, words):
    monkeypatch.setenv("TEST_JIGUANG_SECRET", SECRET)
    mapping = [{"column": "points", "attribute": "points", "type": "Long", "rule": "overwrite", **change}]
    cfg = write_config(tmp_path / "syncs.yaml", "sqlite://", [jiguang_sync("http://x", mapping=mapping)])
    with pytest.raises(config.ConfigError) as e:
        config.load(cfg)
    assert e.value.field == field and words in e.value.message


def test_project_id_is_required(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JIGUANG_SECRET", SECRET)
    sync = jiguang_sync("http://x")
    sync["vendor"]["settings"] = {}
    with pytest.raises(config.ConfigError, match="project_id"):
        config.load(write_config(tmp_path / "syncs.yaml", "sqlite://", [sync]))


def test_jiguang_rule_names_and_aliases_map_to_engine_rules():
    assert {r: client.Client.rules[r] for r in ("once", "overwrite", "accumulate", "append", "set", "increase")} == {
        "once": "once", "overwrite": "set", "accumulate": "increase", "append": "append",
        "set": "set", "increase": "increase"}


def test_emulator_from_specs_registers_types_rules_and_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JIGUANG_SECRET", SECRET)
    cfg, _ = config.load(write_config(tmp_path / "syncs.yaml", "sqlite://", [jiguang_sync("http://x")]))
    emu = jiguang.emulator(cfg.syncs)
    assert {k: v["rule"] for k, v in emu.attributes.items()} == CONSOLE
    assert emu.attributes["subscribed"]["type"] == "boolean"
    assert (emu.project_id, emu.project_secret) == ("proj-7", SECRET)


def test_emulator_enforces_the_documented_contract(jg):
    """Straight HTTP against the emulator: auth, shape, names, value types, console rules."""
    url = jg.url + "/smartop/api/v1/user/attribute"
    auth = (jg.emulator.project_id, SECRET)

    def put(body, auth=auth):
        r = requests.put(url, json=body, auth=auth, timeout=5)
        return r.status_code, r.json()["code"]

    assert put({"cuid": 5, "data": {"membership": "pro"}}, auth=("proj-7", "nope")) == (401, 4009)
    assert put({"data": {"membership": "pro"}}) == (400, 40007)
    assert put({"cuid": "abc", "data": {"membership": "pro"}}) == (400, 40003)
    assert put({"cuid": 5, "data": {}})[1] == 40002
    assert put({"cuid": 5, "data": {"membership": "pro"}, "extra": 1})[1] == 40002
    assert put({"cuid": 5, "data": {"nope": 1}})[1] == 40010
    assert put({"cuid": 5, "data": {"membership": ""}})[1] == 40009
    assert put({"cuid": 5, "data": {"subscribed": True}})[1] == 40002  # booleans only as 0/1
    assert put({"cuid": 5, "data": {"signup_at": "2026-01-01T00:00:00Z"}})[1] == 40002
    assert put({"cuid": 5, "data": {"points": "7"}})[1] == 40002
    assert jg.emulator.state() == {}  # nothing invalid was applied
    for body in ({"points": 7, "signup_at": "2026-01-01 00:00:00", "interests": ["a"], "membership": "free"},
                 {"points": 5, "signup_at": "2027-02-02 00:00:00", "interests": ["b"], "membership": "pro"}):
        assert put({"cuid": 5, "data": {**body, "subscribed": 1}}) == (200, 0)
    assert jg.emulator.state() == {"5": {"points": 12, "signup_at": "2026-01-01 00:00:00", "interests": ["a", "b"],
                                         "membership": "pro", "subscribed": 1}}
